//! One model configuration for all supported architectures, read from a Hugging Face config.json.
//!
//! Where config.json omits a field we use the default of transformers' configuration class for that
//! architecture (real checkpoints rely on them); shapes are then checked against the weights, so a
//! default that disagrees with the checkpoint fails naming the field.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

mod deepseek;
pub use crate::model::yarn::Yarn;
pub use deepseek::{LatentAttention, SoftmaxGroups};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Architecture {
    /// MixtralForCausalLM: <https://huggingface.co/docs/transformers/model_doc/mixtral>
    Mixtral,
    /// Qwen2MoeForCausalLM: <https://huggingface.co/docs/transformers/model_doc/qwen2_moe>
    Qwen2Moe,
    /// OPTForCausalLM (dense): <https://huggingface.co/docs/transformers/model_doc/opt>
    Opt,
    /// LlamaForCausalLM (dense, gated SwiGLU MLP): <https://huggingface.co/docs/transformers/model_doc/llama>
    Llama,
    /// Qwen3MoeForCausalLM: <https://huggingface.co/docs/transformers/model_doc/qwen3_moe>
    Qwen3Moe,
    /// OlmoeForCausalLM: <https://huggingface.co/docs/transformers/model_doc/olmoe>
    Olmoe,
    /// GraniteMoeForCausalLM: <https://huggingface.co/docs/transformers/model_doc/granitemoe>
    GraniteMoe,
    /// GraniteMoeSharedForCausalLM (GraniteMoe with an always-on shared MLP):
    /// <https://huggingface.co/docs/transformers/model_doc/granitemoeshared>
    GraniteMoeShared,
    /// Glm4MoeForCausalLM: <https://huggingface.co/docs/transformers/model_doc/glm4_moe>
    Glm4Moe,
    /// GptOssForCausalLM: <https://huggingface.co/docs/transformers/model_doc/gpt_oss>
    GptOss,
    /// DeepseekV2ForCausalLM: <https://huggingface.co/docs/transformers/model_doc/deepseek_v2>
    DeepseekV2,
    /// DeepseekV3ForCausalLM: <https://huggingface.co/docs/transformers/model_doc/deepseek_v3>
    DeepseekV3,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Opt => "OPTForCausalLM",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
            Architecture::Olmoe => "OlmoeForCausalLM",
            Architecture::GraniteMoe => "GraniteMoeForCausalLM",
            Architecture::GraniteMoeShared => "GraniteMoeSharedForCausalLM",
            Architecture::Glm4Moe => "Glm4MoeForCausalLM",
            Architecture::GptOss => "GptOssForCausalLM",
            Architecture::DeepseekV2 => "DeepseekV2ForCausalLM",
            Architecture::DeepseekV3 => "DeepseekV3ForCausalLM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    Silu,
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

/// An RMSNorm of the queries and keys after their projections, before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QkNorm {
    /// Each head's `head_dim` values on their own (Qwen3-MoE).
    PerHead,
    /// The whole projection, all heads together (OLMoE).
    Whole,
}

/// Scalars and options of the families that need them (Granite's multipliers); every default
/// is "none", so a config without them reads as before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchOptions {
    /// The embeddings are multiplied by this before the first layer (Granite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_multiplier: Option<f32>,
    /// The attention softmax scale in place of `1/sqrt(head_dim)` (Granite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_multiplier: Option<f32>,
    /// Each block's output is multiplied by this before it joins the residual (Granite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residual_multiplier: Option<f32>,
    /// The logits are divided by this (Granite).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_scaling: Option<f32>,
    /// RoPE turns only the first this many values of each head (GLM-4-MoE's
    /// `partial_rotary_factor`); `None`: all `head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_dim: Option<usize>,
    /// Sigmoid routing with a correction bias and group-limited choice (GLM-4-MoE); `None`:
    /// softmax top-k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grouped_sigmoid: Option<GroupedSigmoid>,
    /// Which layers `sliding_window` applies to (GPT-OSS's `layer_types`: true for
    /// `sliding_attention`); `None`: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windowed_layers: Option<Vec<bool>>,
    /// Each attention head has a learned sink logit (`self_attn.sinks`) that joins its softmax
    /// denominator and is then dropped (GPT-OSS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attention_sinks: bool,
    /// The experts' gated activation is GPT-OSS's clamped SwiGLU in place of
    /// `act(gate) ⊙ up`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamped_swiglu: Option<ClampedSwiglu>,
    /// DeepSeek-V2's softmax routing, group-limited or not; `None`: see `grouped_sigmoid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_groups: Option<SoftmaxGroups>,
    /// Multi-head latent attention (DeepSeek) in place of q/k/v projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<LatentAttention>,
    /// YaRN-scaled RoPE frequencies and attention factor (`rope_type: yarn`: GPT-OSS,
    /// DeepSeek); `None`: plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yarn: Option<Yarn>,
}

/// GPT-OSS's expert activation: `gate` clamped to at most `limit`, `up` to `[-limit, limit]`,
/// then `(up + 1) · gate · sigmoid(alpha · gate)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClampedSwiglu {
    pub alpha: f32,
    pub limit: f32,
}

/// DeepSeek-V3-style routing (GLM-4-MoE): scores `sigmoid(logits)`; experts are chosen by
/// `score + e_score_correction_bias` among the `topk_group` groups (of `n_group`) whose two best
/// such values sum highest; the chosen experts' plain scores, renormalized where
/// `norm_topk_prob` says, times `routed_scaling_factor`, mix their outputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupedSigmoid {
    pub n_group: usize,
    pub topk_group: usize,
    pub routed_scaling_factor: f32,
}

impl GroupedSigmoid {
    /// The groups must split the experts evenly, at least two a group (a group is scored by
    /// its two best), and offer at least `top_k` experts.
    fn check(
        &self,
        experts: usize,
        top_k: usize,
    ) -> std::result::Result<(), (&'static str, String)> {
        check_groups(
            (self.n_group, self.topk_group, self.routed_scaling_factor),
            experts,
            top_k,
            2,
        )
    }
}

/// The checks DeepSeek-style group-limited routings share: `n_group` splits the `experts`
/// evenly, at least `min_per_group` a group; `topk_group` of them offer at least `top_k`
/// experts; the scaling factor is a finite non-zero number.
pub(super) fn check_groups(
    (n, topk_group, scale): (usize, usize, f32),
    experts: usize,
    top_k: usize,
    min_per_group: usize,
) -> std::result::Result<(), (&'static str, String)> {
    if n == 0 || !experts.is_multiple_of(n) || experts / n < min_per_group {
        let why = if min_per_group > 1 {
            format!("{n} must split the {experts} experts into groups of two or more")
        } else {
            format!("{n} does not split the {experts} experts")
        };
        return Err(("n_group", why));
    }
    if topk_group == 0 || topk_group > n {
        return Err(("topk_group", format!("{topk_group} is not in 1..={n}")));
    }
    if top_k > topk_group * (experts / n) {
        return Err((
            "num_experts_per_tok",
            format!(
                "{top_k} is more than the {} experts of topk_group {topk_group} groups",
                topk_group * (experts / n)
            ),
        ));
    }
    if !(scale.is_finite() && scale != 0.0) {
        return Err((
            "routed_scaling_factor",
            format!("{scale} must be a finite non-zero number"),
        ));
    }
    Ok(())
}

impl ArchOptions {
    /// True when no option is set (the config then serializes as before).
    pub fn is_plain(&self) -> bool {
        *self == ArchOptions::default()
    }
}

/// What the feed-forward part of one decoder layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FfnKind {
    /// Routed experts (plus a gated shared expert where `shared_expert_ffn` is set).
    Moe,
    /// A dense gated MLP (Llama; Qwen2-MoE's mlp_only_layers / decoder_sparse_step).
    DenseGated,
    /// OPT's fc1 → activation → fc2.
    DensePlain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f32,
    /// RoPE base; `None` for learned absolute positions (OPT).
    pub rope_theta: Option<f32>,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub activation: Activation,
    pub layer_ffn: Vec<FfnKind>,
    /// Hidden width of a dense FFN layer.
    pub dense_ffn: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Hidden width of one routed expert.
    pub expert_ffn: usize,
    /// Renormalize the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    pub shared_expert_ffn: Option<usize>,
    pub attention_bias: bool,
    /// OPT: embeddings of this width, projected to `hidden_size` when they differ.
    pub word_embed_proj_dim: usize,
    /// OPT: pre-norm (true) or post-norm (false, OPT-350m) blocks.
    pub pre_norm: bool,
    /// OPT: a final LayerNorm after the last block.
    pub final_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Gated MLPs' down-projections read their input through a Walsh–Hadamard transform on
    /// runs of this many values (a rotated quantized model; `quant::rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_hadamard_block: Option<usize>,
    /// The head reads the final norm's output through a `hidden × hidden` linear
    /// (`P.transform`, `P` the final norm): a rotated model whose head is tied to the rotated
    /// embedding table keeps the final norm's weight there (`quant::rotate`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub head_transform: bool,
    /// q_norm / k_norm after the q and k projections (Qwen3-MoE, OLMoE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNorm>,
    /// OLMoE: q, k and v clamped to `[-clip, clip]` after their projections (and q/k norms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_qkv: Option<f32>,
    /// The families' own scalars and options (see [`ArchOptions`]).
    #[serde(default, skip_serializing_if = "ArchOptions::is_plain")]
    pub options: ArchOptions,
}

/// Most decoder layers a config may claim (the largest real checkpoints have ~130): the
/// per-layer tables are allocated from this count before any weight is read.
pub const MAX_LAYERS: usize = 1 << 14;

/// Reads config.json fields with a per-architecture default and names the field on error.
struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn present(&self, field: &str) -> Option<&Value> {
        self.json.get(field).filter(|v| !v.is_null())
    }

    fn usize_or(&self, field: &str, default: Option<usize>) -> Result<usize> {
        match self.present(field) {
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                Error::config(
                    self.path,
                    field,
                    format!("expected a non-negative integer, got {v}"),
                )
            }),
            None => default.ok_or_else(|| Error::config(self.path, field, "missing")),
        }
    }

    fn positive(&self, field: &str, default: Option<usize>) -> Result<usize> {
        let v = self.usize_or(field, default)?;
        if v == 0 {
            return Err(Error::config(self.path, field, "must be positive"));
        }
        Ok(v)
    }

    /// `num_hidden_layers`, refused above [`MAX_LAYERS`] before anything is sized by it.
    fn layers(&self, default: usize) -> Result<usize> {
        let n = self.positive("num_hidden_layers", Some(default))?;
        if n > MAX_LAYERS {
            return Err(Error::config(
                self.path,
                "num_hidden_layers",
                format!("{n} is more than {MAX_LAYERS} layers"),
            ));
        }
        Ok(n)
    }

    /// A token id: a non-negative integer that fits in 32 bits (never silently truncated).
    fn opt_token_id(&self, field: &str) -> Result<Option<u32>> {
        match self.present(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| Error::config(self.path, field, format!("{v} is not a token id"))),
        }
    }

    fn f32_or(&self, field: &str, default: f32) -> Result<f32> {
        match self.present(field) {
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
                Error::config(self.path, field, format!("expected a number, got {v}"))
            }),
            None => Ok(default),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.present(field) {
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::config(self.path, field, format!("expected true/false, got {v}"))
            }),
            None => Ok(default),
        }
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.present(field) {
            Some(_) => self.usize_or(field, None).map(Some),
            None => Ok(None),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        token_id_list(self.present(field)).ok_or_else(|| {
            Error::config(
                self.path,
                field,
                "expected a token id or a list of token ids",
            )
        })
    }
}

/// `eos_token_id` may be an integer or a list of integers (generation_config.json).
pub fn token_id_list(v: Option<&Value>) -> Option<Vec<u32>> {
    // An id past u32 is refused, not truncated to another token.
    let id = |x: Option<u64>| x.and_then(|x| u32::try_from(x).ok());
    match v {
        None | Some(Value::Null) => Some(vec![]),
        Some(Value::Number(n)) => id(n.as_u64()).map(|x| vec![x]),
        Some(Value::Array(items)) => items.iter().map(|i| id(i.as_u64())).collect(),
        _ => None,
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "(file)".into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&json, path)
    }

    pub fn from_json(json: &Value, path: &Path) -> Result<ModelConfig> {
        let f = Fields { json, path };
        let arch = architecture(&f)?;
        let cfg = match arch {
            Architecture::Mixtral => mixtral(&f)?,
            Architecture::Qwen2Moe => qwen2_moe(&f)?,
            Architecture::Opt => opt(&f)?,
            Architecture::Llama => llama(&f)?,
            Architecture::Qwen3Moe => qwen3_moe(&f)?,
            Architecture::Olmoe => olmoe(&f)?,
            Architecture::GraniteMoe => granite_moe(&f, false)?,
            Architecture::GraniteMoeShared => granite_moe(&f, true)?,
            Architecture::Glm4Moe => glm4_moe(&f)?,
            Architecture::GptOss => gpt_oss(&f)?,
            Architecture::DeepseekV2 => deepseek::deepseek(&f, false)?,
            Architecture::DeepseekV3 => deepseek::deepseek(&f, true)?,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the fields that the shapes and the forward pass rely on; the error names the
    /// config.json field. Run on every config, whichever file it came from (config.json, GGUF
    /// metadata, an .emoe header).
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.check()
            .map_err(|(field, reason)| Error::config(path, field, reason))
    }

    /// [`Self::validate`] without a path: the offending field and why.
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be positive".into()));
            }
        }
        if self.num_layers > MAX_LAYERS {
            return Err((
                "num_hidden_layers",
                format!("{} is more than {MAX_LAYERS} layers", self.num_layers),
            ));
        }
        // Shapes are products of these; one that wraps would match a tensor of another shape.
        let products = [
            ("num_attention_heads", self.num_heads, self.head_dim),
            ("num_key_value_heads", self.num_kv_heads, self.head_dim),
            ("vocab_size", self.vocab_size, self.hidden_size),
        ];
        for (field, a, b) in products {
            if a.checked_mul(b).is_none_or(|n| n > isize::MAX as usize) {
                return Err((field, format!("{a} × {b} overflows")));
            }
        }
        if self.max_position_embeddings > isize::MAX as usize {
            return Err((
                "max_position_embeddings",
                format!("{} is too large", self.max_position_embeddings),
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err((
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            ));
        }
        if self.rope_theta.is_some() && !self.head_dim.is_multiple_of(2) {
            return Err((
                "head_dim",
                format!("{} must be even for RoPE", self.head_dim),
            ));
        }
        if let Some(theta) = self.rope_theta {
            if !(theta.is_finite() && theta > 0.0) {
                return Err(("rope_theta", format!("{theta} must be a positive number")));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return Err((
                "rms_norm_eps",
                format!("{} must be a non-negative number", self.norm_eps),
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(("sliding_window", "must be positive or null".into()));
        }
        if self.layer_ffn.len() != self.num_layers {
            return Err((
                "num_hidden_layers",
                format!(
                    "{} layers, but {} layer kinds are listed",
                    self.num_layers,
                    self.layer_ffn.len()
                ),
            ));
        }
        if self.is_moe() {
            if self.top_k == 0 || self.top_k > self.num_experts {
                return Err((
                    "num_experts_per_tok",
                    format!("{} is not in 1..={}", self.top_k, self.num_experts),
                ));
            }
            if self.expert_ffn == 0 {
                return Err(("moe_intermediate_size", "must be positive".into()));
            }
        }
        if self.shared_expert_ffn == Some(0) {
            return Err((
                "shared_expert_intermediate_size",
                "must be positive where a shared expert exists".into(),
            ));
        }
        if self.layer_ffn.iter().any(|k| *k != FfnKind::Moe) && self.dense_ffn == 0 {
            return Err(("intermediate_size", "must be positive".into()));
        }
        if self.word_embed_proj_dim == 0 {
            return Err(("word_embed_proj_dim", "must be positive".into()));
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return Err(("clip_qkv", format!("{c} must be a positive number")));
            }
        }
        let o = &self.options;
        let scalars = [
            ("embedding_multiplier", o.embedding_multiplier),
            ("attention_multiplier", o.attention_multiplier),
            ("residual_multiplier", o.residual_multiplier),
            ("logits_scaling", o.logits_scaling),
        ];
        for (field, v) in scalars {
            if let Some(v) = v.filter(|v| !v.is_finite() || *v == 0.0) {
                return Err((field, format!("{v} must be a finite non-zero number")));
            }
        }
        // Before the rotary width, which latent attention sets from qk_rope_head_dim.
        if let Some(m) = &o.mla {
            m.check(self.head_dim)?;
        }
        if let Some(r) = o.rotary_dim {
            if r == 0 || r > self.head_dim || !r.is_multiple_of(2) {
                return Err((
                    "partial_rotary_factor",
                    format!(
                        "gives {r} rotated values a head; must be even, in 2..={}",
                        self.head_dim
                    ),
                ));
            }
        }
        if let Some(g) = &o.grouped_sigmoid {
            g.check(self.num_experts, self.top_k)?;
        }
        if let Some(w) = &o.windowed_layers {
            if w.len() != self.num_layers {
                return Err((
                    "layer_types",
                    format!("{} entries for {} layers", w.len(), self.num_layers),
                ));
            }
        }
        if let Some(y) = &o.yarn {
            // Read through Yarn::from_block, but a store's config is deserialized directly.
            y.check().map_err(|why| ("rope_parameters", why))?;
        }
        if let Some(c) = &o.clamped_swiglu {
            if !(c.alpha.is_finite() && c.limit.is_finite() && c.limit > 0.0) {
                return Err((
                    "swiglu_limit",
                    format!(
                        "alpha {} and limit {} must be finite, the limit positive",
                        c.alpha, c.limit
                    ),
                ));
            }
        }
        if let Some(g) = &o.softmax_groups {
            g.check(self.num_experts, self.top_k)?;
        }
        let head_reads_hidden = self.word_embed_proj_dim == self.hidden_size;
        if self.head_transform
            && !(self.tie_word_embeddings && self.final_norm && head_reads_hidden)
        {
            return Err((
                "head_transform",
                "needs tied word embeddings, a final norm and no output projection".into(),
            ));
        }
        if let Some(b) = self.ffn_hadamard_block {
            let widths = [self.dense_ffn, self.expert_ffn]
                .into_iter()
                .chain(self.shared_expert_ffn)
                .filter(|&f| f > 0);
            let fits = b.is_power_of_two() && (2..=4096).contains(&b);
            if !fits || widths.clone().any(|f| !f.is_multiple_of(b)) {
                return Err((
                    "ffn_hadamard_block",
                    format!("{b} is not a power of two in 2..=4096 dividing every MLP width"),
                ));
            }
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Floats of the key (and value) projections a token: `num_kv_heads × head_dim`. Under
    /// latent attention the cache holds other rows: see [`Self::kv_layout`].
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// What the KV cache holds per token and layer: a key and a value of [`Self::kv_dim`]
    /// floats, or under multi-head latent attention one row `[latent | rotated shared key]`
    /// (`kv_lora_rank + qk_rope_head_dim` floats) whose latent prefix is the value.
    pub fn kv_layout(&self) -> crate::kv::KvLayout {
        match &self.options.mla {
            Some(m) => {
                crate::kv::KvLayout::key_prefix(m.kv_lora_rank + m.qk_rope_head_dim, m.kv_lora_rank)
            }
            None => crate::kv::KvLayout::separate(self.kv_dim()),
        }
    }

    /// KV heads the cache holds (what per-KV-head eviction keeps maps for): `num_kv_heads`, or
    /// 1 under latent attention, whose row every query head shares.
    pub fn cache_kv_heads(&self) -> usize {
        match &self.options.mla {
            Some(_) => 1,
            None => self.num_kv_heads,
        }
    }

    pub fn is_moe(&self) -> bool {
        self.layer_ffn.contains(&FfnKind::Moe)
    }

    /// The sliding window of layer `layer`'s attention (GPT-OSS windows only its
    /// `sliding_attention` layers).
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        match &self.options.windowed_layers {
            Some(w) if !w.get(layer).copied().unwrap_or(false) => None,
            _ => self.sliding_window,
        }
    }

    /// Applies generation_config.json: its eos/bos override the model config's.
    pub fn apply_generation_config(&mut self, json: &Value) {
        if let Some(ids) = token_id_list(json.get("eos_token_id")) {
            if !ids.is_empty() {
                self.eos_token_ids = ids;
            }
        }
        if let Some(b) = json
            .get("bos_token_id")
            .and_then(Value::as_u64)
            .and_then(|b| u32::try_from(b).ok())
        {
            self.bos_token_id = Some(b);
        }
    }
}

fn architecture(f: &Fields) -> Result<Architecture> {
    let name = match f
        .present("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
    {
        Some(n) => n.to_string(),
        None => match f.present("model_type").and_then(Value::as_str) {
            Some("mixtral") => return Ok(Architecture::Mixtral),
            Some("qwen2_moe") => return Ok(Architecture::Qwen2Moe),
            Some("opt") => return Ok(Architecture::Opt),
            Some("llama") => return Ok(Architecture::Llama),
            Some("qwen3_moe") => return Ok(Architecture::Qwen3Moe),
            Some("olmoe") => return Ok(Architecture::Olmoe),
            Some("granitemoe") => return Ok(Architecture::GraniteMoe),
            Some("granitemoeshared") => return Ok(Architecture::GraniteMoeShared),
            Some("glm4_moe") => return Ok(Architecture::Glm4Moe),
            Some("gpt_oss") => return Ok(Architecture::GptOss),
            Some("deepseek_v2") => return Ok(Architecture::DeepseekV2),
            Some("deepseek_v3") => return Ok(Architecture::DeepseekV3),
            Some(other) => other.to_string(),
            None => {
                return Err(Error::config(
                    f.path,
                    "architectures",
                    "missing (and no model_type to fall back on)",
                ))
            }
        },
    };
    match name.as_str() {
        "MixtralForCausalLM" => Ok(Architecture::Mixtral),
        "Qwen2MoeForCausalLM" => Ok(Architecture::Qwen2Moe),
        "OPTForCausalLM" => Ok(Architecture::Opt),
        "LlamaForCausalLM" => Ok(Architecture::Llama),
        "Qwen3MoeForCausalLM" => Ok(Architecture::Qwen3Moe),
        "OlmoeForCausalLM" => Ok(Architecture::Olmoe),
        "GraniteMoeForCausalLM" => Ok(Architecture::GraniteMoe),
        "GraniteMoeSharedForCausalLM" => Ok(Architecture::GraniteMoeShared),
        "Glm4MoeForCausalLM" => Ok(Architecture::Glm4Moe),
        "GptOssForCausalLM" => Ok(Architecture::GptOss),
        "DeepseekV2ForCausalLM" => Ok(Architecture::DeepseekV2),
        "DeepseekV3ForCausalLM" => Ok(Architecture::DeepseekV3),
        _ => Err(Error::UnknownArchitecture {
            path: f.path.to_path_buf(),
            name,
        }),
    }
}

/// RoPE base from `rope_theta` or the newer `rope_parameters` / legacy `rope_scaling`; only the
/// default (unscaled) rope type is supported, anything else is refused rather than run wrongly.
fn rope_theta(f: &Fields, default: f32) -> Result<f32> {
    for field in ["rope_parameters", "rope_scaling"] {
        if let Some(p) = f.present(field) {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if kind != "default" {
                return Err(Error::config(
                    f.path,
                    field,
                    format!("rope_type `{kind}` is not supported (only `default`)"),
                ));
            }
            if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
                return Ok(theta as f32);
            }
        }
    }
    f.f32_or("rope_theta", default)
}

/// `sliding_window`: null or absent means none; 0 would hide every token, so it is refused.
fn window(f: &Fields) -> Result<Option<usize>> {
    match f.opt_usize("sliding_window")? {
        Some(0) => Err(Error::config(
            f.path,
            "sliding_window",
            "must be positive or null",
        )),
        w => Ok(w),
    }
}

fn activation(f: &Fields, field: &str, default: &str) -> Result<Activation> {
    let name = f
        .present(field)
        .map(|v| v.as_str().unwrap_or(""))
        .unwrap_or(default);
    match name {
        "silu" | "swish" => Ok(Activation::Silu),
        "relu" => Ok(Activation::Relu),
        "gelu" => Ok(Activation::Gelu),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        other => Err(Error::config(
            f.path,
            field,
            format!("activation `{other}` is not supported"),
        )),
    }
}

fn attention_shape(
    f: &Fields,
    hidden_default: usize,
    heads_default: usize,
    kv_default: Option<usize>,
) -> Result<(usize, usize, usize, usize)> {
    let hidden = f.positive("hidden_size", Some(hidden_default))?;
    let heads = f.positive("num_attention_heads", Some(heads_default))?;
    let kv = f.positive("num_key_value_heads", Some(kv_default.unwrap_or(heads)))?;
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) if d > 0 => d,
        _ => {
            if hidden % heads != 0 {
                return Err(Error::config(
                    f.path,
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size {hidden}"),
                ));
            }
            hidden / heads
        }
    };
    Ok((hidden, heads, kv, head_dim))
}

/// Defaults from transformers' MixtralConfig.
fn mixtral(f: &Fields) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 4096, 32, Some(8))?;
    let layers = f.layers(32)?;
    let ffn = f.positive("intermediate_size", Some(14336))?;
    Ok(ModelConfig {
        arch: Architecture::Mixtral,
        vocab_size: f.positive("vocab_size", Some(32000))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(4096 * 32))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-5)?,
        rope_theta: Some(rope_theta(f, 1e6)?),
        sliding_window: window(f)?,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: ffn,
        num_experts: f.positive("num_local_experts", Some(8))?,
        top_k: f.positive("num_experts_per_tok", Some(2))?,
        expert_ffn: ffn,
        norm_topk_prob: true,
        shared_expert_ffn: None,
        attention_bias: false,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: Some(f.opt_token_id("bos_token_id")?.unwrap_or(1)),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: match f.token_ids("eos_token_id")? {
            ids if ids.is_empty() => vec![2],
            ids => ids,
        },
    })
}

/// Defaults from transformers' Qwen2MoeConfig.
fn qwen2_moe(f: &Fields) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 2048, 16, None)?;
    let layers = f.layers(24)?;
    let num_experts = f.usize_or("num_experts", Some(60))?;
    let layer_ffn = sparse_layers(f, layers, num_experts)?;
    let shared = f.usize_or("shared_expert_intermediate_size", Some(5632))?;
    // transformers windows only the layers from max_window_layers on; refuse rather than run
    // a different model.
    if f.bool_or("use_sliding_window", false)? {
        return Err(Error::config(
            f.path,
            "use_sliding_window",
            "true is not supported (per-layer sliding windows)",
        ));
    }
    Ok(ModelConfig {
        arch: Architecture::Qwen2Moe,
        vocab_size: f.positive("vocab_size", Some(151936))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(32768))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn,
        dense_ffn: f.positive("intermediate_size", Some(5632))?,
        num_experts,
        top_k: f.positive("num_experts_per_tok", Some(4))?,
        expert_ffn: f.positive("moe_intermediate_size", Some(1408))?,
        norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
        shared_expert_ffn: (shared > 0).then_some(shared),
        attention_bias: f.bool_or("qkv_bias", true)?,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}

/// Qwen2/3-MoE's layer kinds, as their decoder layers decide: experts unless listed in
/// `mlp_only_layers` or off the `decoder_sparse_step`.
fn sparse_layers(f: &Fields, layers: usize, num_experts: usize) -> Result<Vec<FfnKind>> {
    let sparse_step = f.positive("decoder_sparse_step", Some(1))?;
    let not_a_list = || {
        Error::config(
            f.path,
            "mlp_only_layers",
            "expected a list of layer indices",
        )
    };
    let mlp_only: Vec<usize> = match f.present("mlp_only_layers") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(not_a_list)?,
        Some(_) => return Err(not_a_list()),
        None => vec![],
    };
    Ok((0..layers)
        .map(|i| {
            if !mlp_only.contains(&i) && num_experts > 0 && (i + 1) % sparse_step == 0 {
                FfnKind::Moe
            } else {
                FfnKind::DenseGated
            }
        })
        .collect())
}

/// The expert count, which transformers' Qwen3-MoE / OLMoE configs take as `num_experts` or
/// `num_local_experts` (one an alias of the other; Qwen3-MoE writes the latter).
fn expert_count(f: &Fields, default: usize) -> Result<usize> {
    let a = f.opt_usize("num_experts")?;
    let b = f.opt_usize("num_local_experts")?;
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(Error::config(
            f.path,
            "num_local_experts",
            format!("{b} disagrees with num_experts {a}"),
        )),
        (Some(n), _) | (None, Some(n)) => Ok(n),
        (None, None) => Ok(default),
    }
}

/// Refuses `field: true` where edgemoe has no such option (rather than run another model).
fn refuse_true(f: &Fields, field: &str, why: &str) -> Result<()> {
    if f.bool_or(field, false)? {
        return Err(Error::config(
            f.path,
            field,
            format!("true is not supported ({why})"),
        ));
    }
    Ok(())
}

/// Defaults from transformers' Qwen3MoeConfig: Qwen2-MoE's layer plan without the shared
/// expert or q/k/v biases, and an RMSNorm on every query and key head.
fn qwen3_moe(f: &Fields) -> Result<ModelConfig> {
    // Real checkpoints set head_dim (Qwen3-30B-A3B: 128, not hidden / heads = 64).
    let (hidden, heads, kv, head_dim) = attention_shape(f, 2048, 32, Some(4))?;
    let layers = f.layers(24)?;
    let num_experts = expert_count(f, 128)?;
    refuse_true(f, "use_sliding_window", "per-layer sliding windows")?;
    refuse_true(f, "attention_bias", "biases on q/k/v/o")?;
    Ok(ModelConfig {
        arch: Architecture::Qwen3Moe,
        vocab_size: f.positive("vocab_size", Some(151936))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(32768))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn: sparse_layers(f, layers, num_experts)?,
        dense_ffn: f.positive("intermediate_size", Some(6144))?,
        num_experts,
        top_k: f.positive("num_experts_per_tok", Some(8))?,
        expert_ffn: f.positive("moe_intermediate_size", Some(768))?,
        norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
        shared_expert_ffn: None,
        attention_bias: false,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: Some(QkNorm::PerHead),
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}

/// Defaults from transformers' OlmoeConfig: experts in every layer (of `intermediate_size`),
/// an RMSNorm over the whole q and k projections, and q/k/v optionally clamped (`clip_qkv`).
fn olmoe(f: &Fields) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 2048, 16, None)?;
    let layers = f.layers(16)?;
    refuse_true(f, "attention_bias", "biases on q/k/v/o")?;
    let ffn = f.positive("intermediate_size", Some(2048))?;
    let clip_qkv = match f.present("clip_qkv") {
        Some(v) => Some(v.as_f64().map(|c| c as f32).ok_or_else(|| {
            Error::config(f.path, "clip_qkv", format!("expected a number, got {v}"))
        })?),
        None => None,
    };
    Ok(ModelConfig {
        arch: Architecture::Olmoe,
        vocab_size: f.positive("vocab_size", Some(50304))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(4096))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-5)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: ffn,
        num_experts: match expert_count(f, 64)? {
            0 => return Err(Error::config(f.path, "num_experts", "must be positive")),
            n => n,
        },
        top_k: f.positive("num_experts_per_tok", Some(8))?,
        expert_ffn: ffn,
        norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
        shared_expert_ffn: None,
        attention_bias: false,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: Some(QkNorm::Whole),
        clip_qkv,
        options: Default::default(),
        eos_token_ids: match f.token_ids("eos_token_id")? {
            ids if ids.is_empty() => vec![50279],
            ids => ids,
        },
    })
}

/// Defaults from transformers' GraniteMoeConfig / GraniteMoeSharedConfig: Mixtral's block
/// (the router's softmax over the top-k logits is the renormalized top-k of the full softmax)
/// with four scalars, and for the shared variant an ungated shared MLP of
/// `shared_intermediate_size` (0: none).
fn granite_moe(f: &Fields, shared: bool) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 4096, 32, None)?;
    let layers = f.layers(32)?;
    let ffn = f.positive("intermediate_size", Some(11008))?;
    let shared_ffn = if shared {
        f.usize_or("shared_intermediate_size", Some(0))?
    } else {
        0
    };
    // 1.0 multiplies by one: left out, except the attention scale, which replaces
    // 1/sqrt(head_dim) whatever its value.
    let unless_one = |field: &str| -> Result<Option<f32>> {
        let v = f.f32_or(field, 1.0)?;
        Ok((v != 1.0).then_some(v))
    };
    Ok(ModelConfig {
        arch: if shared {
            Architecture::GraniteMoeShared
        } else {
            Architecture::GraniteMoe
        },
        vocab_size: f.positive("vocab_size", Some(32000))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(2048))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: ffn,
        num_experts: f.positive("num_local_experts", Some(8))?,
        top_k: f.positive("num_experts_per_tok", Some(2))?,
        expert_ffn: ffn,
        norm_topk_prob: true,
        shared_expert_ffn: (shared_ffn > 0).then_some(shared_ffn),
        attention_bias: f.bool_or("attention_bias", false)?,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: Some(f.opt_token_id("bos_token_id")?.unwrap_or(1)),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: ArchOptions {
            embedding_multiplier: unless_one("embedding_multiplier")?,
            attention_multiplier: Some(f.f32_or("attention_multiplier", 1.0)?),
            residual_multiplier: unless_one("residual_multiplier")?,
            logits_scaling: unless_one("logits_scaling")?,
            ..ArchOptions::default()
        },
        eos_token_ids: match f.token_ids("eos_token_id")? {
            ids if ids.is_empty() => vec![2],
            ids => ids,
        },
    })
}

/// Defaults from transformers' Glm4MoeConfig: `first_k_dense_replace` leading dense layers
/// (of `intermediate_size`), then experts of `moe_intermediate_size` with an ungated shared
/// expert `n_shared_experts` times as wide, grouped sigmoid routing ([`GroupedSigmoid`]), RoPE
/// on the first `partial_rotary_factor` of each head (0.5 unless set), biases on q/k/v where
/// `attention_bias`, and per-head q/k RMSNorms where `use_qk_norm`.
fn glm4_moe(f: &Fields) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 4096, 96, Some(8))?;
    let layers = f.layers(46)?;
    let experts = match (
        f.opt_usize("n_routed_experts")?,
        f.opt_usize("num_local_experts")?,
    ) {
        (Some(a), Some(b)) if a != b => {
            return Err(Error::config(
                f.path,
                "num_local_experts",
                format!("{b} disagrees with n_routed_experts {a}"),
            ))
        }
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => 128,
    };
    if experts == 0 {
        return Err(Error::config(
            f.path,
            "n_routed_experts",
            "must be positive",
        ));
    }
    let dense = f.usize_or("first_k_dense_replace", Some(1))?;
    let expert_ffn = f.positive("moe_intermediate_size", Some(1408))?;
    let shared = f.usize_or("n_shared_experts", Some(1))?;
    let shared_ffn = expert_ffn.checked_mul(shared).ok_or_else(|| {
        Error::config(
            f.path,
            "n_shared_experts",
            format!("{shared} × {expert_ffn} overflows"),
        )
    })?;
    // partial_rotary_factor sits in rope_parameters (transformers 5) or at the top level.
    let factor = match f
        .present("rope_parameters")
        .and_then(|p| p.get("partial_rotary_factor"))
    {
        Some(v) => v.as_f64().ok_or_else(|| {
            Error::config(
                f.path,
                "rope_parameters",
                format!("partial_rotary_factor: expected a number, got {v}"),
            )
        })?,
        None => f64::from(f.f32_or("partial_rotary_factor", 0.5)?),
    };
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(Error::config(
            f.path,
            "partial_rotary_factor",
            format!("{factor} is not in (0, 1]"),
        ));
    }
    // transformers: int(head_dim * partial_rotary_factor).
    let rotary = (head_dim as f64 * factor) as usize;
    Ok(ModelConfig {
        arch: Architecture::Glm4Moe,
        vocab_size: f.positive("vocab_size", Some(151552))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(131072))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-5)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
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
        dense_ffn: f.positive("intermediate_size", Some(10944))?,
        num_experts: experts,
        top_k: f.positive("num_experts_per_tok", Some(8))?,
        expert_ffn,
        norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
        shared_expert_ffn: (shared_ffn > 0).then_some(shared_ffn),
        attention_bias: f.bool_or("attention_bias", false)?,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: f.bool_or("use_qk_norm", false)?.then_some(QkNorm::PerHead),
        clip_qkv: None,
        options: ArchOptions {
            rotary_dim: (rotary != head_dim).then_some(rotary),
            grouped_sigmoid: Some(GroupedSigmoid {
                n_group: f.positive("n_group", Some(1))?,
                topk_group: f.positive("topk_group", Some(1))?,
                routed_scaling_factor: f.f32_or("routed_scaling_factor", 1.0)?,
            }),
            ..ArchOptions::default()
        },
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}

/// Defaults from transformers' GptOssConfig: every layer MoE (a router with a bias, softmax
/// over the top-k logits, experts with biases and the clamped SwiGLU of `swiglu_alpha` /
/// `swiglu_limit`), q/k/v/o biases, a sink logit per head, `layer_types` alternating
/// sliding-window and full attention (sliding first), and YaRN RoPE unless `rope_parameters`
/// say otherwise.
fn gpt_oss(f: &Fields) -> Result<ModelConfig> {
    let hidden = f.positive("hidden_size", Some(2880))?;
    let heads = f.positive("num_attention_heads", Some(64))?;
    let kv = f.positive("num_key_value_heads", Some(8))?;
    // GptOssConfig: head_dim 64 unless set; null means hidden_size / num_attention_heads.
    let head_dim = match f.json.get("head_dim") {
        Some(Value::Null) => {
            if hidden % heads != 0 {
                return Err(Error::config(
                    f.path,
                    "num_attention_heads",
                    format!("{heads} does not divide hidden_size {hidden}"),
                ));
            }
            hidden / heads
        }
        _ => f.positive("head_dim", Some(64))?,
    };
    let layers = f.layers(36)?;
    let ffn = f.positive("intermediate_size", Some(2880))?;
    let max_positions = f.positive("max_position_embeddings", Some(131072))?;
    // sliding_window: 128 when absent, none when null.
    let sliding_window = match f.json.get("sliding_window") {
        Some(Value::Null) => None,
        _ => Some(f.positive("sliding_window", Some(128))?),
    };
    let windowed = match f.present("layer_types") {
        None => (0..layers).map(|i| i % 2 == 0).collect(),
        Some(v) => {
            let kinds = v.as_array().ok_or_else(|| {
                Error::config(f.path, "layer_types", "expected a list of layer types")
            })?;
            kinds
                .iter()
                .map(|k| match k.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(Error::config(
                        f.path,
                        "layer_types",
                        format!("{k} is not sliding_attention or full_attention"),
                    )),
                })
                .collect::<Result<Vec<bool>>>()?
        }
    };
    let (theta, yarn) = gpt_oss_rope(f, max_positions)?;
    let swiglu = ClampedSwiglu {
        alpha: f.f32_or("swiglu_alpha", 1.702)?,
        limit: f.f32_or("swiglu_limit", 7.0)?,
    };
    Ok(ModelConfig {
        arch: Architecture::GptOss,
        vocab_size: f.positive("vocab_size", Some(201088))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: max_positions,
        norm_eps: f.f32_or("rms_norm_eps", 1e-5)?,
        rope_theta: Some(theta),
        sliding_window,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        head_transform: false,
        // The experts use `options.clamped_swiglu`; hidden_act is not read by GptOss.
        activation: Activation::Silu,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: ffn,
        num_experts: f.positive("num_local_experts", Some(128))?,
        top_k: f.positive("num_experts_per_tok", Some(4))?,
        expert_ffn: ffn,
        // Softmax over the top-k logits: the renormalized top-k of the full softmax.
        norm_topk_prob: true,
        shared_expert_ffn: None,
        attention_bias: f.bool_or("attention_bias", true)?,
        word_embed_proj_dim: hidden,
        pre_norm: true,
        final_norm: true,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        qk_norm: None,
        clip_qkv: None,
        options: ArchOptions {
            windowed_layers: sliding_window.is_some().then_some(windowed),
            attention_sinks: true,
            yarn,
            clamped_swiglu: Some(swiglu),
            ..ArchOptions::default()
        },
        eos_token_ids: f.token_ids("eos_token_id")?,
    })
}

/// GPT-OSS's RoPE base (150000 unless set) and YaRN scaling: factor 32 over 4096 positions,
/// untruncated, when the config gives no RoPE block.
fn gpt_oss_rope(f: &Fields, max_positions: usize) -> Result<(f32, Option<Yarn>)> {
    let absent = serde_json::json!({"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096});
    rope_and_yarn(f, max_positions, 150000.0, Some(&absent))
}

/// The RoPE base and YaRN scaling as transformers standardizes them, for every family that
/// reads YaRN (GPT-OSS, DeepSeek): `rope_parameters` (transformers 5) or the legacy
/// `rope_scaling`, else `absent` (the family's default block; `None`: plain RoPE); the base in
/// the block or at the top level (`default_theta` unless set); `rope_type` default or yarn,
/// anything else refused naming the field the block came from.
fn rope_and_yarn(
    f: &Fields,
    max_positions: usize,
    default_theta: f32,
    absent: Option<&Value>,
) -> Result<(f32, Option<Yarn>)> {
    let top_theta = f.f32_or("rope_theta", default_theta)?;
    let given = ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|field| f.present(field).map(|p| (field, p)));
    let Some((field, params)) = given.or(absent.map(|p| ("rope_parameters", p))) else {
        return Ok((top_theta, None));
    };
    let bad = |why: String| Error::config(f.path, field, why);
    let number = |key: &str| -> Result<Option<f64>> {
        match params.get(key).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(format!("{key}: expected a number, got {v}"))),
        }
    };
    let theta = number("rope_theta")?.map_or(top_theta, |t| t as f32);
    if number("partial_rotary_factor")?.is_some_and(|p| p != 1.0) {
        return Err(bad(
            "partial_rotary_factor other than 1 is not supported".into()
        ));
    }
    let kind = params
        .get("rope_type")
        .or_else(|| params.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "yarn" => Yarn::from_block(params, max_positions)
            .map(|y| (theta, Some(y)))
            .map_err(bad),
        other => Err(bad(format!(
            "rope_type `{other}` is not supported (default or yarn)"
        ))),
    }
}

/// Defaults from transformers' LlamaConfig.
fn llama(f: &Fields) -> Result<ModelConfig> {
    let (hidden, heads, kv, head_dim) = attention_shape(f, 4096, 32, None)?;
    let layers = f.layers(32)?;
    for field in ["attention_bias", "mlp_bias"] {
        if f.bool_or(field, false)? {
            return Err(Error::config(f.path, field, "true is not supported"));
        }
    }
    let ffn = f.positive("intermediate_size", Some(11008))?;
    Ok(ModelConfig {
        vocab_size: f.positive("vocab_size", Some(32000))?,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        max_position_embeddings: f.positive("max_position_embeddings", Some(2048))?,
        norm_eps: f.f32_or("rms_norm_eps", 1e-6)?,
        rope_theta: Some(rope_theta(f, 10000.0)?),
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        activation: activation(f, "hidden_act", "silu")?,
        bos_token_id: f.opt_token_id("bos_token_id")?,
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: f.token_ids("eos_token_id")?,
        ..ModelConfig::dense_llama(hidden, layers, ffn)
    })
}

impl ModelConfig {
    /// What every dense Llama shares: a SwiGLU MLP of width `ffn` in each of `layers` layers,
    /// pre-norm RMSNorm, RoPE, no experts, no biases. The other fields are placeholders that
    /// the config.json and GGUF readers set from what they read.
    pub fn dense_llama(hidden: usize, layers: usize, ffn: usize) -> ModelConfig {
        ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 0,
            hidden_size: hidden,
            num_layers: layers,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            max_position_embeddings: 0,
            norm_eps: 1e-6,
            rope_theta: Some(10000.0),
            sliding_window: None,
            tie_word_embeddings: false,
            activation: Activation::Silu,
            layer_ffn: vec![FfnKind::DenseGated; layers],
            dense_ffn: ffn,
            num_experts: 0,
            top_k: 0,
            expert_ffn: 0,
            norm_topk_prob: false,
            shared_expert_ffn: None,
            attention_bias: false,
            word_embed_proj_dim: hidden,
            pre_norm: true,
            final_norm: true,
            bos_token_id: None,
            ffn_hadamard_block: None,
            head_transform: false,
            qk_norm: None,
            clip_qkv: None,
            options: Default::default(),
            eos_token_ids: Vec::new(),
        }
    }
}

/// Defaults from transformers' OPTConfig.
fn opt(f: &Fields) -> Result<ModelConfig> {
    let hidden = f.positive("hidden_size", Some(768))?;
    let heads = f.positive("num_attention_heads", Some(12))?;
    if hidden % heads != 0 {
        return Err(Error::config(
            f.path,
            "num_attention_heads",
            format!("{heads} does not divide hidden_size {hidden}"),
        ));
    }
    let layers = f.layers(12)?;
    let pre_norm = f.bool_or("do_layer_norm_before", true)?;
    let remove_final = f.bool_or("_remove_final_layer_norm", false)?;
    if !f.bool_or("layer_norm_elementwise_affine", true)? {
        return Err(Error::config(
            f.path,
            "layer_norm_elementwise_affine",
            "false is not supported",
        ));
    }
    let ffn = f.positive("ffn_dim", Some(3072))?;
    Ok(ModelConfig {
        arch: Architecture::Opt,
        vocab_size: f.positive("vocab_size", Some(50272))?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim: hidden / heads,
        max_position_embeddings: f.positive("max_position_embeddings", Some(2048))?,
        norm_eps: 1e-5,
        rope_theta: None,
        sliding_window: None,
        tie_word_embeddings: f.bool_or("tie_word_embeddings", true)?,
        activation: activation(f, "activation_function", "relu")?,
        layer_ffn: vec![FfnKind::DensePlain; layers],
        dense_ffn: ffn,
        num_experts: 0,
        top_k: 0,
        expert_ffn: 0,
        norm_topk_prob: false,
        shared_expert_ffn: None,
        attention_bias: f.bool_or("enable_bias", true)?,
        word_embed_proj_dim: f.positive("word_embed_proj_dim", Some(hidden))?,
        pre_norm,
        final_norm: pre_norm && !remove_final,
        bos_token_id: Some(f.opt_token_id("bos_token_id")?.unwrap_or(2)),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: {
            let ids = f.token_ids("eos_token_id")?;
            if ids.is_empty() {
                vec![2]
            } else {
                ids
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn mixtral_defaults_fill_missing_fields() {
        let c = parse(json!({"architectures": ["MixtralForCausalLM"], "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_experts, 8);
        assert_eq!(c.rope_theta, Some(1e6));
    }

    #[test]
    fn rope_parameters_are_read_and_scaling_refused() {
        let c = parse(json!({"model_type": "mixtral", "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})).unwrap();
        assert_eq!(c.rope_theta, Some(5000.0));
        let e = parse(
            json!({"model_type": "mixtral", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_scaling"), "{e}");
    }

    #[test]
    fn qwen_layer_kinds_follow_sparse_step_and_mlp_only() {
        let c = parse(json!({"architectures": ["Qwen2MoeForCausalLM"], "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]})).unwrap();
        assert_eq!(
            c.layer_ffn,
            vec![
                FfnKind::DenseGated,
                FfnKind::Moe,
                FfnKind::DenseGated,
                FfnKind::DenseGated
            ]
        );
    }

    #[test]
    fn architecture_defaults_follow_transformers() {
        let q = parse(json!({"architectures": ["Qwen2MoeForCausalLM"]})).unwrap();
        assert_eq!((q.hidden_size, q.num_heads, q.head_dim), (2048, 16, 128));
        let m = parse(json!({"architectures": ["MixtralForCausalLM"]})).unwrap();
        assert_eq!(
            (m.bos_token_id, m.eos_token_ids.clone()),
            (Some(1), vec![2])
        );
        let o = parse(json!({"model_type": "opt", "activation_function": "gelu_new"})).unwrap();
        assert_eq!(o.activation, Activation::GeluTanh);
        let l = parse(json!({"architectures": ["LlamaForCausalLM"]})).unwrap();
        assert_eq!(
            (l.hidden_size, l.num_kv_heads, l.dense_ffn),
            (4096, 32, 11008)
        );
        assert_eq!((l.norm_eps, l.rope_theta), (1e-6, Some(10000.0)));
        assert_eq!(l.layer_ffn, vec![FfnKind::DenseGated; 32]);
        let e = parse(json!({"model_type": "llama", "mlp_bias": true})).unwrap_err();
        assert!(e.to_string().contains("mlp_bias"), "{e}");
        let e = parse(json!({"model_type": "mixtral", "sliding_window": 0})).unwrap_err();
        assert!(e.to_string().contains("sliding_window"), "{e}");
        let e = parse(json!({"model_type": "qwen2_moe", "use_sliding_window": true})).unwrap_err();
        assert!(e.to_string().contains("use_sliding_window"), "{e}");
    }

    #[test]
    fn qwen3_moe_and_olmoe_follow_transformers() {
        // Qwen3MoeConfig: head_dim from config.json when set, else hidden / heads; experts as
        // num_experts or num_local_experts (what transformers 5 writes).
        let q = parse(
            json!({"model_type": "qwen3_moe", "head_dim": 128, "num_local_experts": 16,
            "num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
        )
        .unwrap();
        assert_eq!((q.head_dim, q.num_experts, q.top_k), (128, 16, 8));
        assert_eq!(
            (q.shared_expert_ffn, q.qk_norm),
            (None, Some(QkNorm::PerHead))
        );
        assert_eq!(
            q.layer_ffn,
            vec![
                FfnKind::DenseGated,
                FfnKind::Moe,
                FfnKind::DenseGated,
                FfnKind::DenseGated
            ]
        );
        let q = parse(json!({"architectures": ["Qwen3MoeForCausalLM"]})).unwrap();
        assert_eq!((q.head_dim, q.num_kv_heads, q.num_experts), (64, 4, 128));
        let o = parse(json!({"model_type": "olmoe", "clip_qkv": 8.0})).unwrap();
        assert_eq!((o.num_experts, o.top_k, o.expert_ffn), (64, 8, 2048));
        assert_eq!((o.clip_qkv, o.qk_norm), (Some(8.0), Some(QkNorm::Whole)));
        assert_eq!(o.eos_token_ids, vec![50279]);
        assert_eq!(o.layer_ffn, vec![FfnKind::Moe; 16]);
        let bad = [
            (
                json!({"model_type": "qwen3_moe", "attention_bias": true}),
                "attention_bias",
            ),
            (
                json!({"model_type": "qwen3_moe", "use_sliding_window": true}),
                "use_sliding_window",
            ),
            (
                json!({"model_type": "qwen3_moe", "num_experts": 8, "num_local_experts": 4}),
                "num_local_experts",
            ),
            (
                json!({"model_type": "olmoe", "attention_bias": true}),
                "attention_bias",
            ),
            (json!({"model_type": "olmoe", "clip_qkv": -1.0}), "clip_qkv"),
            (
                json!({"model_type": "olmoe", "clip_qkv": "big"}),
                "clip_qkv",
            ),
            (
                json!({"model_type": "olmoe", "num_experts": 0}),
                "num_experts",
            ),
        ];
        for (cfg, field) in bad {
            let e = parse(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn granite_moe_follows_transformers() {
        // GraniteMoeConfig's defaults: the attention scale is 1.0 (not 1/sqrt(head_dim)) when
        // unset; multipliers of one are left out.
        let g = parse(json!({"model_type": "granitemoe"})).unwrap();
        assert_eq!((g.num_experts, g.top_k, g.expert_ffn), (8, 2, 11008));
        assert_eq!(g.options.attention_multiplier, Some(1.0));
        assert_eq!(g.options.embedding_multiplier, None);
        assert!(g.norm_topk_prob && g.shared_expert_ffn.is_none());
        let g = parse(json!({"architectures": ["GraniteMoeForCausalLM"],
            "embedding_multiplier": 12.0, "attention_multiplier": 0.015625,
            "residual_multiplier": 0.22, "logits_scaling": 6.0, "attention_bias": true}))
        .unwrap();
        assert_eq!(g.options.embedding_multiplier, Some(12.0));
        assert_eq!(g.options.logits_scaling, Some(6.0));
        assert!(g.attention_bias);
        let s = parse(json!({"model_type": "granitemoeshared", "shared_intermediate_size": 64}))
            .unwrap();
        assert_eq!(
            (s.arch, s.shared_expert_ffn),
            (Architecture::GraniteMoeShared, Some(64))
        );
        let s = parse(json!({"model_type": "granitemoeshared"})).unwrap();
        assert_eq!(s.shared_expert_ffn, None);
        for (cfg, field) in [
            (
                json!({"model_type": "granitemoe", "logits_scaling": 0.0}),
                "logits_scaling",
            ),
            (
                json!({"model_type": "granitemoe", "residual_multiplier": "x"}),
                "residual_multiplier",
            ),
            (
                json!({"model_type": "granitemoe", "rope_scaling": {"rope_type": "yarn"}}),
                "rope_scaling",
            ),
        ] {
            let e = parse(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn glm4_moe_follows_transformers() {
        // Glm4MoeConfig: one leading dense layer, partial_rotary_factor 0.5 unless set, one
        // group, a shared expert of moe_intermediate_size.
        // (Its default 96 heads do not divide hidden 4096: real configs set head_dim.)
        let g = parse(json!({"model_type": "glm4_moe", "num_hidden_layers": 3,
            "num_attention_heads": 32}))
        .unwrap();
        assert_eq!(
            g.layer_ffn,
            vec![FfnKind::DenseGated, FfnKind::Moe, FfnKind::Moe]
        );
        assert_eq!((g.head_dim, g.options.rotary_dim), (128, Some(64)));
        assert_eq!(
            (g.num_experts, g.top_k, g.shared_expert_ffn),
            (128, 8, Some(1408))
        );
        assert_eq!(
            g.options.grouped_sigmoid,
            Some(GroupedSigmoid {
                n_group: 1,
                topk_group: 1,
                routed_scaling_factor: 1.0
            })
        );
        assert!(g.norm_topk_prob && g.qk_norm.is_none());
        // GLM-4.5-Air's fields; the factor at the top level or in rope_parameters.
        let g = parse(
            json!({"architectures": ["Glm4MoeForCausalLM"], "head_dim": 128,
            "partial_rotary_factor": 1.0, "n_routed_experts": 128, "n_group": 1,
            "n_shared_experts": 1, "moe_intermediate_size": 1408, "use_qk_norm": true,
            "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "num_hidden_layers": 46}),
        )
        .unwrap();
        assert_eq!(g.options.rotary_dim, None);
        assert_eq!(g.qk_norm, Some(QkNorm::PerHead));
        let g = parse(
            json!({"model_type": "glm4_moe", "head_dim": 16, "n_shared_experts": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
            "partial_rotary_factor": 0.25}}),
        )
        .unwrap();
        assert_eq!((g.options.rotary_dim, g.rope_theta), (Some(4), Some(1e6)));
        assert_eq!(g.shared_expert_ffn, None);
        for (cfg, field) in [
            (
                json!({"model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 3}),
                "n_group",
            ),
            (
                json!({"model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 4, "topk_group": 5}),
                "topk_group",
            ),
            (
                json!({"model_type": "glm4_moe", "n_routed_experts": 8, "n_group": 4,
                "topk_group": 1, "num_experts_per_tok": 3}),
                "num_experts_per_tok",
            ),
            (
                json!({"model_type": "glm4_moe", "partial_rotary_factor": 0.0}),
                "partial_rotary_factor",
            ),
            (
                json!({"model_type": "glm4_moe", "head_dim": 6, "partial_rotary_factor": 0.5}),
                "partial_rotary_factor",
            ),
            (
                json!({"model_type": "glm4_moe", "n_routed_experts": 8, "num_local_experts": 4}),
                "num_local_experts",
            ),
            (
                json!({"model_type": "glm4_moe", "routed_scaling_factor": 0.0}),
                "routed_scaling_factor",
            ),
            (
                json!({"model_type": "glm4_moe", "rope_scaling": {"rope_type": "yarn"}}),
                "rope_scaling",
            ),
            (json!({"model_type": "glm4_moe"}), "num_attention_heads"),
            (
                json!({"model_type": "glm4_moe", "head_dim": 128, "bos_token_id": 4_294_967_297u64}),
                "bos_token_id",
            ),
            (
                json!({"model_type": "glm4_moe", "head_dim": 128,
                "num_hidden_layers": 1_000_000_000_000u64}),
                "num_hidden_layers",
            ),
        ] {
            // A workable head_dim, so that the field under test is the one refused.
            let mut cfg = cfg;
            if field != "num_attention_heads" && cfg.get("head_dim").is_none() {
                cfg["head_dim"] = json!(128);
            }
            let e = parse(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn gpt_oss_follows_transformers() {
        // GptOssConfig: head_dim 64 (not hidden / heads), sliding layers first and every other,
        // a window of 128, YaRN ×32 over 4096 positions untruncated, theta 150000.
        let g = parse(json!({"model_type": "gpt_oss", "num_hidden_layers": 4})).unwrap();
        assert_eq!((g.head_dim, g.num_heads, g.num_kv_heads), (64, 64, 8));
        assert_eq!((g.num_experts, g.top_k, g.expert_ffn), (128, 4, 2880));
        assert_eq!(g.sliding_window, Some(128));
        let windows: Vec<_> = (0..4).map(|i| g.window_of(i)).collect();
        assert_eq!(windows, vec![Some(128), None, Some(128), None]);
        assert_eq!(g.rope_theta, Some(150000.0));
        let y = g.options.yarn.unwrap();
        assert_eq!((y.factor, y.original_max_position_embeddings), (32.0, 4096));
        assert!(!y.truncate);
        // transformers' get_mscale(32): 0.1·ln 32 + 1.
        assert!((y.attention_factor - (0.1 * 32f64.ln() + 1.0)).abs() < 1e-12);
        assert!(g.options.attention_sinks && g.attention_bias && g.norm_topk_prob);
        let s = g.options.clamped_swiglu.unwrap();
        assert_eq!((s.alpha, s.limit), (1.702, 7.0));
        // gpt-oss-20b's config.json (legacy rope_scaling; layer_types listed).
        let g = parse(
            json!({"architectures": ["GptOssForCausalLM"], "head_dim": 64,
            "hidden_size": 2880, "num_attention_heads": 64, "num_hidden_layers": 2,
            "num_local_experts": 32, "rope_theta": 150000, "sliding_window": 128,
            "layer_types": ["full_attention", "sliding_attention"], "swiglu_limit": 7.0,
            "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                "original_max_position_embeddings": 4096, "rope_type": "yarn",
                "truncate": false}}),
        )
        .unwrap();
        assert_eq!((g.window_of(0), g.window_of(1)), (None, Some(128)));
        assert_eq!(g.num_experts, 32);
        // `truncate` absent: true, as transformers reads it; null window and head_dim.
        let g = parse(json!({"model_type": "gpt_oss", "sliding_window": null,
            "head_dim": null, "hidden_size": 256, "num_attention_heads": 8,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                "attention_factor": 1.5}}))
        .unwrap();
        let y = g.options.yarn.unwrap();
        assert!(y.truncate);
        assert_eq!(
            (y.attention_factor, y.beta_fast, y.beta_slow),
            (1.5, 32.0, 1.0)
        );
        assert_eq!(y.original_max_position_embeddings, 131072);
        assert_eq!(
            (g.head_dim, g.sliding_window, g.window_of(0)),
            (32, None, None)
        );
        let g = parse(json!({"model_type": "gpt_oss",
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}))
        .unwrap();
        assert_eq!((g.options.yarn, g.rope_theta), (None, Some(5e5)));
        for (cfg, field) in [
            (
                json!({"model_type": "gpt_oss", "num_hidden_layers": 2,
                "layer_types": ["sliding_attention"]}),
                "layer_types",
            ),
            (
                json!({"model_type": "gpt_oss", "layer_types": ["chunked_attention"]}),
                "layer_types",
            ),
            (
                json!({"model_type": "gpt_oss", "rope_parameters": {"rope_type": "llama3"}}),
                "rope_parameters",
            ),
            (
                json!({"model_type": "gpt_oss", "rope_scaling": {"rope_type": "yarn",
                "factor": -2.0}}),
                "rope_scaling",
            ),
            (
                json!({"model_type": "gpt_oss", "rope_parameters": {"rope_type": "yarn",
                "factor": 2.0, "truncate": "no"}}),
                "rope_parameters",
            ),
            (
                json!({"model_type": "gpt_oss", "swiglu_limit": 0.0}),
                "swiglu_limit",
            ),
            (
                json!({"model_type": "gpt_oss", "sliding_window": 0}),
                "sliding_window",
            ),
        ] {
            let e = parse(cfg).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e = parse(json!({"architectures": ["MixtralForCausalLM"], "hidden_size": "big"}))
            .unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = parse(json!({"architectures": ["GPT2LMHeadModel"]})).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
        // An architecture not implemented is refused by name, with the list of what is.
        let e = parse(json!({"architectures": ["DbrxForCausalLM"]})).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("DbrxForCausalLM")
                && e.contains("GptOssForCausalLM")
                && e.contains("DeepseekV3ForCausalLM"),
            "{e}"
        );
        // A layer count past MAX_LAYERS is refused before the per-layer table is allocated
        // (10^12 aborted the process), and ids past u32 are refused, not truncated.
        for arch in [
            "llama",
            "mixtral",
            "qwen2_moe",
            "opt",
            "qwen3_moe",
            "olmoe",
            "granitemoe",
            "gpt_oss",
        ] {
            let e = parse(json!({"model_type": arch, "num_hidden_layers": 1_000_000_000_000u64}))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("num_hidden_layers") && e.contains("16384"),
                "{arch}: {e}"
            );
            let e = parse(json!({"model_type": arch, "bos_token_id": 4_294_967_297u64}))
                .unwrap_err()
                .to_string();
            assert!(e.contains("bos_token_id"), "{arch}: {e}");
            let e = parse(json!({"model_type": arch, "eos_token_id": [2, 4_294_967_298u64]}))
                .unwrap_err()
                .to_string();
            assert!(e.contains("eos_token_id"), "{arch}: {e}");
        }
        // num_attention_heads × head_dim wrapped to 0 and asked q_proj for [0, hidden].
        let e = parse(
            json!({"model_type": "llama", "num_attention_heads": 1u64 << 32,
            "num_key_value_heads": 1u64 << 32, "head_dim": 1u64 << 32}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("num_attention_heads") && e.contains("overflows"),
            "{e}"
        );
        let mut c = parse(json!({"model_type": "llama"})).unwrap();
        c.apply_generation_config(
            &json!({"bos_token_id": 4_294_967_297u64, "eos_token_id": 4_294_967_298u64}),
        );
        // Ids past u32 are ignored (they once became tokens 1 and 2).
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone()), (None, vec![]));
        let e = parse(json!({})).unwrap_err();
        assert!(e.to_string().contains("architectures"), "{e}");
        let e = parse(json!({"model_type": "mixtral", "num_experts_per_tok": 9})).unwrap_err();
        assert!(e.to_string().contains("num_experts_per_tok"), "{e}");
    }
}
