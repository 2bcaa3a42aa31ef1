//! Writes any model edgemoe loads as a Hugging Face checkpoint directory, so transformers and
//! llama.cpp's converter can read the very same weights (side-by-side benchmarks of the
//! built-in models):
//!
//! - `config.json` in the architecture's transformers format. It is parsed back with
//!   [`ModelConfig::from_json`] before anything is written, and the export fails, naming the
//!   field, when that would not give this model's configuration back.
//! - `model.safetensors`: every tensor under its checkpoint name, in f32, bf16 (round to
//!   nearest even) or f16. Streamed: the header is computed from the shapes, then one tensor
//!   at a time is converted and written, so memory holds at most one extra tensor.
//! - `tokenizer.json` and `tokenizer_config.json`: the model's own tokenizer, or for the
//!   byte-level tokenizer of the built-in models a generated one with the same token ids
//!   (see [`byte_tokenizer_json`]).
//! - `generation_config.json` with the BOS/EOS ids.
//!
//! A quantized `.emoe` store exports its int8 weights dequantized (`q · scale`, with any
//! SmoothQuant input scale folded into the columns): the f32 model its kernels approximate.

use crate::error::{Error, Result};
use crate::model::config::{Activation, Architecture, FfnKind, ModelConfig};
use crate::model::tokenizer::Tokenizer;
use crate::model::weights::{Ffn, GatedMlp, Linear, LinearWeight, MoeBlock, Norm, Weights};
use crate::model::Model;
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The element type written to model.safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    F32,
    Bf16,
    F16,
}

impl ExportDtype {
    /// The name `--dtype` takes.
    pub fn name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "f32",
            ExportDtype::Bf16 => "bf16",
            ExportDtype::F16 => "f16",
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "F32",
            ExportDtype::Bf16 => "BF16",
            ExportDtype::F16 => "F16",
        }
    }

    /// The name config.json's `dtype` / `torch_dtype` use.
    fn torch_name(self) -> &'static str {
        match self {
            ExportDtype::F32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::F16 => "float16",
        }
    }

    fn size(self) -> usize {
        match self {
            ExportDtype::F32 => 4,
            ExportDtype::Bf16 | ExportDtype::F16 => 2,
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub dir: PathBuf,
    pub tensors: usize,
    pub params: u64,
    /// Size of model.safetensors.
    pub safetensors_bytes: u64,
    /// True when tokenizer.json was generated for the byte-level tokenizer.
    pub generated_tokenizer: bool,
}

/// bf16 bits of `x`, rounded to nearest even (what torch's `.to(torch.bfloat16)` does); NaN
/// stays a (quiet) NaN of the same sign, values past bf16's largest finite round to ±inf.
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x0040;
    }
    // Cannot overflow: the largest non-NaN pattern is 0xff80_0000.
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Writes `model` into `dir` (created when missing). `progress(done, total)` is called with
/// the bytes of model.safetensors written so far.
pub fn export(
    model: &Model,
    dir: &Path,
    dtype: ExportDtype,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportSummary> {
    // A rotated model's down-projections are written back unrotated (`Values::RotatedInput`),
    // so the checkpoint needs no run-time transform.
    // A head tied to the embeddings through a transform (a rotated tied model) is written as
    // its own matrix, the table times the transform: transformers has no such transform.
    let cfg = &ModelConfig {
        ffn_hadamard_block: None,
        head_transform: false,
        tie_word_embeddings: model.config.tie_word_embeddings
            && model.weights.head_transform.is_none(),
        ..model.config.clone()
    };
    let config = hf_config_json(cfg, dtype);
    check_round_trip(cfg, &config, &dir.join("config.json"))?;
    // create_dir_all on a file says only "File exists (os error 17)".
    if dir.exists() && !dir.is_dir() {
        return Err(Error::invalid(format!(
            "{}: is not a directory (the export writes a checkpoint directory)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        // edgemoe and transformers would both read the old shards instead of the new file.
        return Err(Error::invalid(format!(
            "{} exists: a sharded checkpoint is already in the output directory",
            index.display()
        )));
    }
    let layout = match cfg.arch {
        Architecture::GraniteMoe | Architecture::GraniteMoeShared => ExpertLayout::Granite,
        Architecture::GptOss => ExpertLayout::GptOss,
        _ => ExpertLayout::PerExpert,
    };
    let tensors = tensors(&model.weights, model.config.ffn_hadamard_block, layout)?;
    let safetensors_bytes =
        write_safetensors(&dir.join("model.safetensors"), &tensors, dtype, progress)?;
    let generated_tokenizer = matches!(model.tokenizer, Tokenizer::Bytes);
    write_json(&dir.join("config.json"), &config)?;
    write_json(
        &dir.join("generation_config.json"),
        &generation_config_json(cfg),
    )?;
    let (tokenizer, tokenizer_config) = tokenizer_files(&model.tokenizer, cfg)?;
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)?;
    Ok(ExportSummary {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        params: tensors.iter().map(|t| t.numel() as u64).sum(),
        safetensors_bytes,
        generated_tokenizer,
    })
}

// ---------------------------------------------------------------------------------------------
// config.json

/// The architecture's transformers config.json for `cfg`.
pub fn hf_config_json(cfg: &ModelConfig, dtype: ExportDtype) -> Value {
    let mut c = match cfg.arch {
        Architecture::Mixtral => mixtral_json(cfg),
        Architecture::Qwen2Moe => qwen2_moe_json(cfg),
        Architecture::Opt => opt_json(cfg),
        Architecture::Llama => llama_json(cfg),
        Architecture::Qwen3Moe => qwen3_moe_json(cfg),
        Architecture::Olmoe => olmoe_json(cfg),
        Architecture::GraniteMoe | Architecture::GraniteMoeShared => granite_moe_json(cfg),
        Architecture::Glm4Moe => glm4_moe_json(cfg),
        Architecture::GptOss => gpt_oss_json(cfg),
        Architecture::DeepseekV2 | Architecture::DeepseekV3 => deepseek_json(cfg),
    };
    let m = c.as_object_mut().expect("config is an object");
    m.insert("bos_token_id".into(), json!(cfg.bos_token_id));
    m.insert("eos_token_id".into(), token_ids_json(&cfg.eos_token_ids));
    m.insert("tie_word_embeddings".into(), json!(cfg.tie_word_embeddings));
    m.insert("use_cache".into(), json!(true));
    // `dtype` for transformers ≥ 4.56, `torch_dtype` for older readers.
    m.insert("dtype".into(), json!(dtype.torch_name()));
    m.insert("torch_dtype".into(), json!(dtype.torch_name()));
    c
}

fn mixtral_json(cfg: &ModelConfig) -> Value {
    json!({
        "architectures": [Architecture::Mixtral.hf_name()],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "sliding_window": cfg.sliding_window,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "pad_token_id": null,
    })
}

fn qwen2_moe_json(cfg: &ModelConfig) -> Value {
    // Which layers are dense, said with mlp_only_layers alone (decoder_sparse_step 1): the
    // same layer kinds Qwen2MoeDecoderLayer and config.rs derive from any step and list.
    let mlp_only: Vec<usize> = (0..cfg.num_layers)
        .filter(|&i| cfg.layer_ffn[i] != FfnKind::Moe)
        .collect();
    json!({
        "architectures": [Architecture::Qwen2Moe.hf_name()],
        "model_type": "qwen2_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn,
        "moe_intermediate_size": cfg.expert_ffn,
        "shared_expert_intermediate_size": cfg.shared_expert_ffn.unwrap_or(0),
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": mlp_only,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": cfg.num_layers,
        "qkv_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
        "pad_token_id": null,
    })
}

/// Qwen2-MoE's config without the shared expert and with `attention_bias` (always false: a
/// Qwen3-MoE with biases is refused at load) in place of `qkv_bias`.
fn qwen3_moe_json(cfg: &ModelConfig) -> Value {
    let mut v = qwen2_moe_json(cfg);
    if let Some(m) = v.as_object_mut() {
        m.remove("shared_expert_intermediate_size");
        m.remove("qkv_bias");
        m.insert("attention_bias".into(), json!(false));
        m.insert(
            "architectures".into(),
            json!([Architecture::Qwen3Moe.hf_name()]),
        );
        m.insert("model_type".into(), json!("qwen3_moe"));
    }
    v
}

fn olmoe_json(cfg: &ModelConfig) -> Value {
    json!({
        "architectures": [Architecture::Olmoe.hf_name()],
        "model_type": "olmoe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "clip_qkv": cfg.clip_qkv.map(f32_json),
        "attention_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.01,
        "pad_token_id": null,
    })
}

fn granite_moe_json(cfg: &ModelConfig) -> Value {
    let o = &cfg.options;
    let mut v = json!({
        "architectures": [cfg.arch.hf_name()],
        "model_type": "granitemoe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "embedding_multiplier": f32_json(o.embedding_multiplier.unwrap_or(1.0)),
        "attention_multiplier": f32_json(o.attention_multiplier.unwrap_or(1.0)),
        "residual_multiplier": f32_json(o.residual_multiplier.unwrap_or(1.0)),
        "logits_scaling": f32_json(o.logits_scaling.unwrap_or(1.0)),
        "initializer_range": 0.02,
        "output_router_logits": false,
        "router_aux_loss_coef": 0.001,
    });
    if let (Architecture::GraniteMoeShared, Some(m)) = (cfg.arch, v.as_object_mut()) {
        m.insert("model_type".into(), json!("granitemoeshared"));
        m.insert(
            "shared_intermediate_size".into(),
            json!(cfg.shared_expert_ffn.unwrap_or(0)),
        );
    }
    v
}

fn glm4_moe_json(cfg: &ModelConfig) -> Value {
    let o = &cfg.options;
    let dense = cfg
        .layer_ffn
        .iter()
        .take_while(|k| **k != FfnKind::Moe)
        .count();
    let shared = cfg.shared_expert_ffn.unwrap_or(0) / cfg.expert_ffn.max(1);
    let rotary = o.rotary_dim.unwrap_or(cfg.head_dim);
    let g = o.grouped_sigmoid;
    json!({
        "architectures": [Architecture::Glm4Moe.hf_name()],
        "model_type": "glm4_moe",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn,
        "moe_intermediate_size": cfg.expert_ffn,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": shared,
        "num_experts_per_tok": cfg.top_k,
        "first_k_dense_replace": dense,
        "norm_topk_prob": cfg.norm_topk_prob,
        "n_group": g.map_or(1, |g| g.n_group),
        "topk_group": g.map_or(1, |g| g.topk_group),
        "routed_scaling_factor": f32_json(g.map_or(1.0, |g| g.routed_scaling_factor)),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "partial_rotary_factor": rotary as f64 / cfg.head_dim.max(1) as f64,
        "use_qk_norm": cfg.qk_norm.is_some(),
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "initializer_range": 0.02,
        "num_nextn_predict_layers": 0,
    })
}

/// `rope_parameters` as transformers 5 writes them, for every family that reads YaRN (GPT-OSS,
/// DeepSeek): the base, and YaRN's parameters resolved (the attention factor explicit, so
/// transformers computes no other; DeepSeek's `mscale_all_dim` where it has one).
fn rope_parameters_json(cfg: &ModelConfig) -> Value {
    let theta = cfg.rope_theta.map(f32_json);
    let Some(y) = &cfg.options.yarn else {
        return json!({"rope_type": "default", "rope_theta": theta});
    };
    let mut rope = json!({
        "rope_type": "yarn",
        "rope_theta": theta,
        "factor": y.factor,
        "original_max_position_embeddings": y.original_max_position_embeddings,
        "beta_fast": y.beta_fast,
        "beta_slow": y.beta_slow,
        "truncate": y.truncate,
        "attention_factor": y.attention_factor,
    });
    if y.mscale_all_dim != 0.0 {
        rope["mscale_all_dim"] = json!(y.mscale_all_dim);
    }
    rope
}

fn gpt_oss_json(cfg: &ModelConfig) -> Value {
    let o = &cfg.options;
    let rope = rope_parameters_json(cfg);
    let layer_types: Vec<&str> = (0..cfg.num_layers)
        .map(|i| match (cfg.sliding_window, &o.windowed_layers) {
            (Some(_), Some(w)) if !w.get(i).copied().unwrap_or(false) => "full_attention",
            (Some(_), _) => "sliding_attention",
            (None, _) => "full_attention",
        })
        .collect();
    let swiglu = o.clamped_swiglu;
    json!({
        "architectures": [Architecture::GptOss.hf_name()],
        "model_type": "gpt_oss",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.expert_ffn,
        "num_local_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "sliding_window": cfg.sliding_window,
        "layer_types": layer_types,
        "swiglu_alpha": swiglu.map(|s| f32_json(s.alpha)),
        "swiglu_limit": swiglu.map(|s| f32_json(s.limit)),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_parameters": rope,
        "initializer_range": 0.02,
    })
}

fn deepseek_json(cfg: &ModelConfig) -> Value {
    let o = &cfg.options;
    let v3 = cfg.arch == Architecture::DeepseekV3;
    let dense = cfg
        .layer_ffn
        .iter()
        .take_while(|k| **k != FfnKind::Moe)
        .count();
    let shared = cfg.shared_expert_ffn.unwrap_or(0) / cfg.expert_ffn.max(1);
    // One of the two routings, by version; its groups and scaling.
    let (n_group, topk_group, scaling) = match (o.grouped_sigmoid, o.softmax_groups) {
        (Some(g), _) => (g.n_group, g.topk_group, g.routed_scaling_factor),
        (None, Some(g)) => (g.n_group, g.topk_group, g.routed_scaling_factor),
        (None, None) => (1, 1, 1.0),
    };
    let rope = rope_parameters_json(cfg);
    let m = o.mla;
    let mut v = json!({
        "architectures": [cfg.arch.hf_name()],
        "model_type": if v3 { "deepseek_v3" } else { "deepseek_v2" },
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn,
        "moe_intermediate_size": cfg.expert_ffn,
        "n_routed_experts": cfg.num_experts,
        "n_shared_experts": shared,
        "num_experts_per_tok": cfg.top_k,
        "first_k_dense_replace": dense,
        "norm_topk_prob": cfg.norm_topk_prob,
        "n_group": n_group,
        "topk_group": topk_group,
        "routed_scaling_factor": f32_json(scaling),
        "q_lora_rank": m.and_then(|m| m.q_lora_rank),
        "kv_lora_rank": m.map(|m| m.kv_lora_rank),
        "qk_nope_head_dim": m.map(|m| m.qk_nope_head_dim),
        "qk_rope_head_dim": m.map(|m| m.qk_rope_head_dim),
        "v_head_dim": m.map(|m| m.v_head_dim),
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "attention_bias": cfg.attention_bias,
        "attention_dropout": 0.0,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_parameters": rope,
        "initializer_range": 0.02,
    });
    let obj = v.as_object_mut().expect("config is an object");
    if v3 {
        obj.insert(
            "rope_interleave".into(),
            json!(m.is_some_and(|m| m.interleaved)),
        );
        obj.insert("num_nextn_predict_layers".into(), json!(0));
    } else {
        let method = if n_group > 1 {
            "group_limited_greedy"
        } else {
            "greedy"
        };
        obj.insert("topk_method".into(), json!(method));
    }
    v
}

fn llama_json(cfg: &ModelConfig) -> Value {
    json!({
        "architectures": [Architecture::Llama.hf_name()],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.dense_ffn,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": activation_name(cfg.activation),
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": f32_json(cfg.norm_eps),
        "rope_theta": cfg.rope_theta.map(f32_json),
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "pad_token_id": null,
    })
}

fn opt_json(cfg: &ModelConfig) -> Value {
    json!({
        "architectures": [Architecture::Opt.hf_name()],
        "model_type": "opt",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "ffn_dim": cfg.dense_ffn,
        "max_position_embeddings": cfg.max_position_embeddings,
        "word_embed_proj_dim": cfg.word_embed_proj_dim,
        "do_layer_norm_before": cfg.pre_norm,
        "_remove_final_layer_norm": cfg.pre_norm && !cfg.final_norm,
        "activation_function": match cfg.activation {
            Activation::GeluTanh => "gelu_new",
            a => activation_name(a),
        },
        "enable_bias": cfg.attention_bias,
        "layer_norm_elementwise_affine": true,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "layerdrop": 0.0,
        "init_std": 0.02,
        "pad_token_id": 1,
    })
}

fn activation_name(a: Activation) -> &'static str {
    match a {
        Activation::Silu => "silu",
        Activation::Relu => "relu",
        Activation::Gelu => "gelu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    }
}

/// An f32 as the shortest decimal that reads back to it (1e-5, not 9.99999974737875e-6).
fn f32_json(x: f32) -> Value {
    x.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

fn token_ids_json(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

fn generation_config_json(cfg: &ModelConfig) -> Value {
    json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": token_ids_json(&cfg.eos_token_ids),
    })
}

/// Parses `config` as config.rs would and fails, naming the fields, unless it gives `cfg`.
fn check_round_trip(cfg: &ModelConfig, config: &Value, path: &Path) -> Result<()> {
    let back = ModelConfig::from_json(config, path)?;
    if back == *cfg {
        return Ok(());
    }
    let (want, got) = (serde_json::to_value(cfg), serde_json::to_value(&back));
    let differing: Vec<String> = match (want, got) {
        (Ok(Value::Object(w)), Ok(Value::Object(g))) => w
            .iter()
            .filter(|(k, v)| g.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k} (model {v}, read back {})",
                    g.get(k).unwrap_or(&Value::Null)
                )
            })
            .collect(),
        _ => vec!["(unknown)".into()],
    };
    Err(Error::invalid(format!(
        "the {} config.json format cannot express this model: {}",
        cfg.arch.hf_name(),
        differing.join(", ")
    )))
}

// ---------------------------------------------------------------------------------------------
// Tensors

/// Where one tensor's f32 values come from.
enum Values<'a> {
    /// A linear layer's `[out, in]` weight.
    Weight(&'a Linear),
    /// Biases, norm weights, positions: stored as they are.
    Floats(&'a [f32]),
    /// A down-projection that reads its input rotated by `rotate_rows` on runs of this block:
    /// the weight of the same linear reading the input as it is (`W·T`, rows `Tᵀ·w`).
    RotatedInput(&'a Linear, usize),
    /// A head tied to the table through a transform `G` it reads its input by: `E·G`.
    Transformed(&'a Linear, &'a Linear),
    /// Several weights one after another in one tensor (Granite's stacked experts), each
    /// with the rotated model's down-projection block where it has one.
    Stacked(Vec<(&'a Linear, Option<usize>)>),
    /// GPT-OSS's `gate_up_proj`: per expert the `[in, 2·out]` product matrix, the gate's
    /// columns and the up projection's interleaved (gate even, up odd).
    Interleaved(Vec<(&'a Linear, &'a Linear)>),
    /// GPT-OSS's `down_proj`: per expert the transposed weight (`[in, out]`), unrotated.
    Transposed(Vec<(&'a Linear, Option<usize>)>),
    /// Values built for the file (GPT-OSS's stacked biases).
    Owned(Vec<f32>),
}

/// How a checkpoint lays out its experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExpertLayout {
    /// One tensor per expert matrix (Mixtral, Qwen, OLMoE, GLM).
    PerExpert,
    /// Granite's `input_linear` / `output_linear` stacks.
    Granite,
    /// GPT-OSS's `gate_up_proj` / `down_proj` stacks with their biases.
    GptOss,
}

struct Tensor<'a> {
    name: String,
    shape: Vec<usize>,
    values: Values<'a>,
}

impl Tensor<'_> {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The values as f32, row-major: borrowed where the model keeps them so, else one copy.
    fn f32s(&self) -> Cow<'_, [f32]> {
        match self.values {
            Values::Floats(v) => Cow::Borrowed(v),
            Values::Owned(ref v) => Cow::Borrowed(v),
            Values::Interleaved(ref pairs) => {
                let mut all = Vec::with_capacity(self.numel());
                for &(gate, up) in pairs {
                    let (g, u) = (linear_rows(gate), linear_rows(up));
                    let (f, h) = (gate.out_features, gate.in_features);
                    for i in 0..h {
                        for j in 0..f {
                            all.extend([g[j * h + i], u[j * h + i]]);
                        }
                    }
                }
                Cow::Owned(all)
            }
            Values::Transposed(ref parts) => {
                let mut all = Vec::with_capacity(self.numel());
                for &(l, block) in parts {
                    let rows = match block {
                        Some(b) => Cow::Owned(unrotated_rows(l, b)),
                        None => linear_rows(l),
                    };
                    let (n, k) = (l.out_features, l.in_features);
                    for i in 0..k {
                        all.extend((0..n).map(|o| rows[o * k + i]));
                    }
                }
                Cow::Owned(all)
            }
            Values::Weight(l) => linear_rows(l),
            Values::RotatedInput(l, block) => Cow::Owned(unrotated_rows(l, block)),
            Values::Transformed(table, g) => Cow::Owned(transformed_rows(table, g)),
            Values::Stacked(ref parts) => {
                let mut all = Vec::with_capacity(self.numel());
                for &(l, block) in parts {
                    match block {
                        Some(b) => all.extend(unrotated_rows(l, b)),
                        None => all.extend_from_slice(&linear_rows(l)),
                    }
                }
                Cow::Owned(all)
            }
        }
    }
}

/// The rows of a down-projection that reads its input rotated on runs of `block`, for an
/// input as it is.
fn unrotated_rows(l: &Linear, block: usize) -> Vec<f32> {
    let mut rows = linear_rows(l).into_owned();
    let k = l.in_features;
    rows.par_chunks_mut(k.max(1))
        .for_each(|row| crate::model::rotation::rotate_rows_back(row, k, block));
    rows
}

/// The rows of `table·g` (`g` square, the table's width): row i is `Σ_j table[i][j]·g[j]`.
fn transformed_rows(table: &Linear, g: &Linear) -> Vec<f32> {
    let (e, g) = (linear_rows(table), linear_rows(g));
    let k = table.in_features;
    let mut out = vec![0f32; table.out_features * k];
    out.par_chunks_mut(k.max(1))
        .zip(e.par_chunks(k.max(1)))
        .for_each(|(o, row)| {
            for (&a, g_row) in row.iter().zip(g.chunks_exact(k)) {
                o.iter_mut().zip(g_row).for_each(|(o, &b)| *o += a * b);
            }
        });
    out
}

/// `[out, in]` row-major f32 weights of `l`; int8 weights dequantized, an input scale folded in.
fn linear_rows(l: &Linear) -> Cow<'_, [f32]> {
    let k = l.in_features;
    let mut rows = match &l.weight {
        LinearWeight::F32Rows(w) if l.input_scale.is_none() => return Cow::Borrowed(w),
        LinearWeight::F32Rows(w) => w.to_vec(),
        LinearWeight::Half(kind, w) => kind.widen(w),
        LinearWeight::Prepared(p) => p.to_rows(),
        LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
            let mut out = vec![0f32; l.out_features * k];
            out.par_chunks_mut(k.max(1))
                .enumerate()
                .for_each(|(j, row)| {
                    let s = m.scales[j];
                    for (o, &q) in row.iter_mut().zip(m.row(j)) {
                        *o = f32::from(q) * s;
                    }
                });
            out
        }
        LinearWeight::Int4(m) => {
            let mut out = vec![0f32; l.out_features * k];
            out.par_chunks_mut(k.max(1))
                .enumerate()
                .for_each(|(j, row)| row.copy_from_slice(&m.dequantize_row(j)));
            out
        }
    };
    if let Some(s) = &l.input_scale {
        rows.par_chunks_mut(k.max(1)).for_each(|row| {
            row.iter_mut().zip(s).for_each(|(w, s)| *w *= s);
        });
    }
    Cow::Owned(rows)
}

/// Hub OPT checkpoints name tensors `decoder.*`; transformers saves `model.decoder.*`.
fn checkpoint_name(prefix: &str) -> String {
    if prefix.starts_with("decoder.") {
        format!("model.{prefix}")
    } else {
        prefix.to_string()
    }
}

/// Every tensor of `w` under its checkpoint name, in the order transformers' modules list
/// them: embeddings, layers, final norm, head; the experts as `layout` says.
fn tensors(w: &Weights, ffn_block: Option<usize>, layout: ExpertLayout) -> Result<Vec<Tensor<'_>>> {
    let mut t = Tensors(Vec::new(), ffn_block);
    t.linear(&w.embed);
    if let Some(p) = &w.positions {
        let root =
            checkpoint_name(w.embed.name.strip_suffix(".embed_tokens").ok_or_else(|| {
                Error::invalid(format!(
                    "cannot name the position embeddings next to `{}`",
                    w.embed.name
                ))
            })?);
        let h = w
            .project_in
            .as_ref()
            .map_or(w.embed.in_features, |l| l.out_features);
        t.floats(
            format!("{root}.embed_positions.weight"),
            vec![p.len() / h.max(1), h],
            p,
        );
    }
    if let Some(l) = &w.project_in {
        t.linear(l);
    }
    for layer in &w.layers {
        t.norm(&layer.attn_norm);
        let a = &layer.attn;
        for l in a.projections() {
            t.linear(l);
        }
        for n in a.norms() {
            t.norm(n);
        }
        if let Some(sinks) = &a.sinks {
            let root = checkpoint_name(a.q.name.trim_end_matches("q_proj"));
            t.floats(format!("{root}sinks"), vec![sinks.len()], sinks);
        }
        t.norm(&layer.ffn_norm);
        match &layer.ffn {
            Ffn::Moe(b) if layout == ExpertLayout::Granite => t.stacked_moe(b)?,
            Ffn::Moe(b) if layout == ExpertLayout::GptOss => t.gpt_oss_moe(b)?,
            Ffn::Moe(b) => {
                t.linear(&b.router);
                if let Some(bias) = &b.score_bias {
                    let name = format!("{}.e_score_correction_bias", b.router.name);
                    t.floats(name, vec![bias.len()], bias);
                }
                for e in &b.experts {
                    t.mlp(e);
                }
                if let Some(s) = &b.shared {
                    t.mlp(&s.mlp);
                    if let Some(g) = &s.gate {
                        t.linear(g);
                    }
                }
            }
            Ffn::Gated(m) => t.mlp(m),
            Ffn::Plain(m) => {
                t.linear(&m.fc1);
                t.linear(&m.fc2);
            }
        }
    }
    if let Some(n) = &w.final_norm {
        t.norm(n);
    }
    if let Some(l) = &w.project_out {
        t.linear(l);
    }
    if let Some(l) = &w.lm_head {
        t.linear(l);
    }
    if let Some(g) = &w.head_transform {
        t.0.push(Tensor {
            name: "lm_head.weight".into(),
            shape: vec![w.embed.out_features, w.embed.in_features],
            values: Values::Transformed(&w.embed, g),
        });
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = t.0.iter().find(|x| !seen.insert(x.name.as_str())) {
        return Err(Error::invalid(format!(
            "two tensors are named `{}`",
            dup.name
        )));
    }
    Ok(t.0)
}

/// The tensors so far, and the rotated model's down-projection block.
struct Tensors<'a>(Vec<Tensor<'a>>, Option<usize>);

impl<'a> Tensors<'a> {
    fn floats(&mut self, name: String, shape: Vec<usize>, v: &'a [f32]) {
        self.0.push(Tensor {
            name,
            shape,
            values: Values::Floats(v),
        });
    }

    fn linear(&mut self, l: &'a Linear) {
        let p = checkpoint_name(&l.name);
        self.0.push(Tensor {
            name: format!("{p}.weight"),
            shape: vec![l.out_features, l.in_features],
            values: Values::Weight(l),
        });
        if let Some(b) = &l.bias {
            self.floats(format!("{p}.bias"), vec![b.len()], b);
        }
    }

    fn mlp(&mut self, m: &'a GatedMlp) {
        self.linear(&m.gate);
        self.linear(&m.up);
        self.linear(&m.down);
        if let (Some(block), Some(down)) = (self.1, self.0.last_mut()) {
            down.values = Values::RotatedInput(&m.down, block);
        }
    }

    /// Granite's block: the router, every expert's gate and up rows in `input_linear`, their
    /// down-projections in `output_linear`, and the shared MLP's likewise.
    fn stacked_moe(&mut self, b: &'a MoeBlock) -> Result<()> {
        let prefix = |l: &Linear, suffix: &str| {
            l.name
                .strip_suffix(suffix)
                .map(str::to_string)
                .ok_or_else(|| Error::invalid(format!("cannot stack `{}` (no `{suffix}`)", l.name)))
        };
        self.linear(&b.router);
        let p = prefix(&b.router, ".router.layer")?;
        let (n, first) = (b.experts.len(), b.experts.first());
        let (f, h) = first.map_or((0, 0), |e| (e.gate.out_features, e.gate.in_features));
        let gate_up = b
            .experts
            .iter()
            .flat_map(|e| [(&e.gate, None), (&e.up, None)]);
        self.0.push(Tensor {
            name: format!("{p}.input_linear.weight"),
            shape: vec![n, 2 * f, h],
            values: Values::Stacked(gate_up.collect()),
        });
        let down = b.experts.iter().map(|e| (&e.down, self.1));
        self.0.push(Tensor {
            name: format!("{p}.output_linear.weight"),
            shape: vec![n, h, f],
            values: Values::Stacked(down.collect()),
        });
        if let Some(s) = &b.shared {
            let p = prefix(&s.mlp.gate, ".gate_proj")?;
            let (m, g) = (&s.mlp, &s.mlp.gate);
            self.0.push(Tensor {
                name: format!("{p}.input_linear.weight"),
                shape: vec![2 * g.out_features, g.in_features],
                values: Values::Stacked(vec![(&m.gate, None), (&m.up, None)]),
            });
            self.0.push(Tensor {
                name: format!("{p}.output_linear.weight"),
                shape: vec![m.down.out_features, m.down.in_features],
                values: Values::Stacked(vec![(&m.down, self.1)]),
            });
        }
        Ok(())
    }

    /// GPT-OSS's block: the router (with its bias), then `experts.gate_up_proj` `[n, h, 2f]`
    /// and `experts.down_proj` `[n, f, h]` as products `x·W`, with their stacked biases.
    fn gpt_oss_moe(&mut self, b: &'a MoeBlock) -> Result<()> {
        self.linear(&b.router);
        let p = b.router.name.strip_suffix(".router").ok_or_else(|| {
            Error::invalid(format!("cannot stack `{}` (no `.router`)", b.router.name))
        })?;
        let p = checkpoint_name(p);
        let (n, first) = (b.experts.len(), b.experts.first());
        let (f, h) = first.map_or((0, 0), |e| (e.gate.out_features, e.gate.in_features));
        let bias = |l: &Linear| {
            l.bias
                .clone()
                .ok_or_else(|| Error::invalid(format!("`{}` has no bias to stack", l.name)))
        };
        let (mut gate_up_bias, mut down_bias) = (Vec::new(), Vec::new());
        for e in &b.experts {
            let (g, u) = (bias(&e.gate)?, bias(&e.up)?);
            gate_up_bias.extend(g.iter().zip(&u).flat_map(|(&g, &u)| [g, u]));
            down_bias.extend(bias(&e.down)?);
        }
        self.0.push(Tensor {
            name: format!("{p}.experts.gate_up_proj"),
            shape: vec![n, h, 2 * f],
            values: Values::Interleaved(b.experts.iter().map(|e| (&e.gate, &e.up)).collect()),
        });
        self.0.push(Tensor {
            name: format!("{p}.experts.gate_up_proj_bias"),
            shape: vec![n, 2 * f],
            values: Values::Owned(gate_up_bias),
        });
        let down = b.experts.iter().map(|e| (&e.down, self.1));
        self.0.push(Tensor {
            name: format!("{p}.experts.down_proj"),
            shape: vec![n, f, h],
            values: Values::Transposed(down.collect()),
        });
        self.0.push(Tensor {
            name: format!("{p}.experts.down_proj_bias"),
            shape: vec![n, h],
            values: Values::Owned(down_bias),
        });
        Ok(())
    }

    fn norm(&mut self, n: &'a Norm) {
        match n {
            Norm::Rms { name, weight, .. } => {
                let p = checkpoint_name(name);
                self.floats(format!("{p}.weight"), vec![weight.len()], weight);
            }
            Norm::Layer {
                name, weight, bias, ..
            } => {
                let p = checkpoint_name(name);
                self.floats(format!("{p}.weight"), vec![weight.len()], weight);
                self.floats(format!("{p}.bias"), vec![bias.len()], bias);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// model.safetensors

/// The JSON header, padded with spaces so the data starts 8-byte aligned (as the reference
/// writer does); tensors follow back to back in `tensors` order.
fn safetensors_header(tensors: &[Tensor], dtype: ExportDtype) -> Result<(Vec<u8>, u64)> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for t in tensors {
        let end = offset + (t.numel() * dtype.size()) as u64;
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype.safetensors_name(), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut bytes = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::invalid(format!("safetensors header: {e}")))?;
    while bytes.len() % 8 != 0 {
        bytes.push(b' ');
    }
    Ok((bytes, offset))
}

/// Streams `tensors` into `path` (through `path.partial`, renamed when complete); returns the
/// file's size.
fn write_safetensors(
    path: &Path,
    tensors: &[Tensor],
    dtype: ExportDtype,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let (header, data_len) = safetensors_header(tensors, dtype)?;
    let partial = path.with_extension("safetensors.partial");
    let io = |e| Error::io(&partial, e);
    let file = std::fs::File::create(&partial).map_err(io)?;
    let mut out = std::io::BufWriter::with_capacity(8 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&header).map_err(io)?;
    let mut buf = Vec::new();
    let mut done = 0u64;
    progress(0, data_len);
    for t in tensors {
        let values = t.f32s();
        if values.len() != t.numel() {
            return Err(Error::invalid(format!(
                "tensor `{}` holds {} values, its shape {:?} says {}",
                t.name,
                values.len(),
                t.shape,
                t.numel()
            )));
        }
        const STEP: usize = 1 << 22;
        for (c, chunk) in values.chunks(STEP).enumerate() {
            encode(chunk, dtype, &mut buf).map_err(|i| {
                Error::invalid(format!(
                    "tensor `{}`: value {} at {} is beyond f16's range (export as bf16 or f32)",
                    t.name,
                    chunk[i],
                    c * STEP + i
                ))
            })?;
            out.write_all(&buf).map_err(io)?;
            done += buf.len() as u64;
            progress(done, data_len);
        }
    }
    out.flush().map_err(io)?;
    drop(out);
    std::fs::rename(&partial, path).map_err(|e| Error::io(path, e))?;
    Ok(8 + header.len() as u64 + data_len)
}

/// Little-endian `dtype` bytes of `values` into `buf`; `Err(index)` of a finite value that
/// f16 cannot hold.
fn encode(values: &[f32], dtype: ExportDtype, buf: &mut Vec<u8>) -> std::result::Result<(), usize> {
    const CHUNK: usize = 1 << 14;
    let size = dtype.size();
    buf.clear();
    buf.resize(values.len() * size, 0);
    let chunks = buf
        .par_chunks_mut(CHUNK * size)
        .zip(values.par_chunks(CHUNK));
    let overflow = chunks.enumerate().filter_map(|(c, (out, vals))| {
        let mut bad = None;
        for (i, (o, &v)) in out.chunks_exact_mut(size).zip(vals).enumerate() {
            match dtype {
                ExportDtype::F32 => o.copy_from_slice(&v.to_le_bytes()),
                ExportDtype::Bf16 => o.copy_from_slice(&bf16_bits(v).to_le_bytes()),
                ExportDtype::F16 => {
                    let h = half::f16::from_f32(v);
                    if v.is_finite() && !h.is_finite() && bad.is_none() {
                        bad = Some(c * CHUNK + i);
                    }
                    o.copy_from_slice(&h.to_le_bytes());
                }
            }
        }
        bad
    });
    match overflow.min() {
        Some(at) => Err(at),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// tokenizer.json and tokenizer_config.json for `tok`.
fn tokenizer_files(tok: &Tokenizer, cfg: &ModelConfig) -> Result<(Value, Value)> {
    let tokenizer = match tok {
        Tokenizer::Hf(t) => {
            let text = t
                .to_string(false)
                .map_err(|e| Error::invalid(format!("cannot serialize the tokenizer: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| Error::invalid(format!("tokenizer serialized as bad JSON: {e}")))?
        }
        Tokenizer::Bytes => byte_tokenizer_json(cfg.vocab_size)?,
    };
    let text_of = |id: u32| match tok {
        Tokenizer::Hf(t) => t.id_to_token(id),
        Tokenizer::Bytes => Some(byte_token_text(id)),
    };
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": cfg.max_position_embeddings,
        "clean_up_tokenization_spaces": false,
    });
    let m = config.as_object_mut().expect("object");
    if let Some(t) = cfg.bos_token_id.and_then(text_of) {
        m.insert("bos_token".into(), json!(t));
    }
    if let Some(t) = cfg.eos_token_ids.first().copied().and_then(text_of) {
        m.insert("eos_token".into(), json!(t));
    }
    if matches!(tok, Tokenizer::Bytes) {
        // Read by llama.cpp's converter: no space in front of the prompt and no BOS or EOS
        // added to it, as the byte tokenizer does.
        m.insert("add_prefix_space".into(), json!(false));
        m.insert("add_bos_token".into(), json!(false));
        m.insert("add_eos_token".into(), json!(false));
    }
    Ok((tokenizer, config))
}

/// The text of token `id` in [`byte_tokenizer_json`].
fn byte_token_text(id: u32) -> String {
    match id {
        0..=255 => format!("<0x{id:02X}>"),
        256 => "<s>".into(),
        257 => "</s>".into(),
        _ => format!("<extra_{id}>"),
    }
}

/// A tokenizer.json with exactly `vocab` tokens that tokenizes as [`Tokenizer::Bytes`] does:
/// a BPE model with no merges whose vocabulary is the 256 byte tokens `<0x00>`…`<0xFF>` at
/// ids 0–255, with `byte_fallback`, so every UTF-8 byte of the text becomes the token of the
/// same id; ids 256 and 257 are `<s>` and `</s>` (the byte tokenizer's BOS and EOS), the ids
/// above `<extra_ID>` placeholders. All ids from 256 on are special added tokens, so decoding
/// skips them as the byte tokenizer does; no normalizer, pre-tokenizer or post-processor.
///
/// transformers loads it as a `PreTrainedTokenizerFast`; llama.cpp's converter takes it as a
/// Llama/SentencePiece-style vocabulary (BPE + byte_fallback + a `Sequence` decoder) with
/// byte tokens. llama.cpp's SentencePiece tokenizer writes a space as `▁`, so a prompt with
/// spaces gets different (byte) ids there; text without spaces the same.
pub fn byte_tokenizer_json(vocab: usize) -> Result<Value> {
    if vocab < 256 {
        return Err(Error::invalid(format!(
            "a byte-level tokenizer needs at least 256 tokens, the model has {vocab}"
        )));
    }
    let bytes: Map<String, Value> = (0..256u32)
        .map(|b| (byte_token_text(b), json!(b)))
        .collect();
    let added: Vec<Value> = (256..vocab as u32)
        .map(|id| {
            json!({"id": id, "content": byte_token_text(id), "single_word": false,
                   "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": bytes,
            "merges": [],
        },
    }))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic;

    #[test]
    fn bf16_rounds_to_nearest_even_like_half() {
        let mut r = crate::util::rng::SplitMix64::new(7);
        let specials = [
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            -f32::INFINITY,
        ];
        let ties = [f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)];
        let random = (0..100_000).map(|_| f32::from_bits(r.next_u64() as u32));
        for x in specials.into_iter().chain(ties).chain(random) {
            let want = half::bf16::from_f32(x);
            if x.is_nan() {
                assert!(half::bf16::from_bits(bf16_bits(x)).is_nan());
            } else {
                assert_eq!(bf16_bits(x), want.to_bits(), "{x:e} ({:#x})", x.to_bits());
            }
        }
        // Ties go to the even mantissa: 1 + 2^-8 down to 1, 1 + 3·2^-8 up to 1 + 2^-6.
        assert_eq!(bf16_bits(ties[0]), 0x3f80);
        assert_eq!(bf16_bits(ties[1]), 0x3f82);
    }

    #[test]
    fn f16_overflow_names_the_index() {
        let mut buf = Vec::new();
        assert_eq!(encode(&[1.0, 7e4, 8e4], ExportDtype::F16, &mut buf), Err(1));
        assert_eq!(
            encode(&[1.0, f32::INFINITY], ExportDtype::F16, &mut buf),
            Ok(())
        );
        assert_eq!(buf.len(), 4);
    }

    #[test]
    fn configs_read_back_as_the_same_model() {
        for cfg in [
            synthetic::default_config(),
            synthetic::mixtral_bench_config(4),
            synthetic::smol_moe_config(),
        ] {
            let v = hf_config_json(&cfg, ExportDtype::Bf16);
            check_round_trip(&cfg, &v, Path::new("config.json")).unwrap();
            assert_eq!(v["rms_norm_eps"], json!(1e-5));
        }
        // Something Mixtral's format has no field for is refused, naming the field.
        let mut cfg = synthetic::default_config();
        cfg.norm_topk_prob = false;
        let err = check_round_trip(
            &cfg,
            &hf_config_json(&cfg, ExportDtype::F32),
            Path::new("c"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("norm_topk_prob"), "{err}");
    }

    #[test]
    fn byte_tokenizer_matches_the_byte_tokenizer() {
        let json = byte_tokenizer_json(300).unwrap().to_string();
        let tok = Tokenizer::from_json_bytes(json.as_bytes(), Path::new("t")).unwrap();
        assert_eq!(tok.vocab_size(), 300);
        let text = "héllo\n wörld 🎉\u{1}";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, Tokenizer::Bytes.encode(text, true).unwrap());
        let mut with_specials = ids.clone();
        with_specials.extend([256, 257, 299]);
        assert_eq!(tok.decode(&with_specials), text);
        assert_eq!(tok.token_text(299).as_deref(), Some("<extra_299>"));
        assert!(byte_tokenizer_json(255).is_err());
    }
}
