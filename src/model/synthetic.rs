//! The built-in default model: a small Mixtral-architecture model with deterministic random
//! weights and a byte-level tokenizer, so a fresh clone runs every command with no download.

use super::arch;
use super::config::{Activation, Architecture, FfnKind, ModelConfig};
use super::tokenizer::{Tokenizer, BYTE_BOS, BYTE_EOS, BYTE_VOCAB};
use super::weights::{Stored, TensorSource, WeightForm};
use super::Model;
use crate::error::Result;
use crate::util::rng::SplitMix64;
use rayon::prelude::*;

pub fn default_config() -> ModelConfig {
    let layers = 4;
    ModelConfig {
        arch: Architecture::Mixtral,
        vocab_size: BYTE_VOCAB,
        hidden_size: 256,
        num_layers: layers,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        max_position_embeddings: 4096,
        norm_eps: 1e-5,
        rope_theta: Some(10000.0),
        sliding_window: None,
        tie_word_embeddings: false,
        activation: Activation::Silu,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: 512,
        num_experts: 8,
        top_k: 2,
        expert_ffn: 512,
        norm_topk_prob: true,
        shared_expert_ffn: None,
        attention_bias: false,
        word_embed_proj_dim: 256,
        pre_norm: true,
        final_norm: true,
        bos_token_id: Some(BYTE_BOS),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: vec![BYTE_EOS],
    }
}

/// Deterministic tensors: norms near one, matrices scaled by 1/sqrt(fan_in).
pub struct SyntheticTensors {
    pub seed: u64,
}

impl TensorSource for SyntheticTensors {
    fn has(&self, name: &str) -> bool {
        // Plain f32 weights only: no quantized tensors, no input scales.
        !name.ends_with(".qweight") && !name.ends_with(".input_scale")
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        Ok(Stored::F32(self.tensor(name, shape, why)?.into()))
    }

    fn tensor(&self, name: &str, shape: &[usize], _why: &str) -> Result<Vec<f32>> {
        // Each tensor's stream depends only on its name, so tensors don't shift when others change.
        let h = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut rng = SplitMix64::new(h);
        let n: usize = shape.iter().product();
        let (center, scale) = if name.ends_with("norm.weight") {
            (1.0, 0.1)
        } else if name.contains("embed_tokens") {
            (0.0, 1.0)
        } else {
            (0.0, 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt())
        };
        // Uniform with unit variance (±√3): cheap enough for gigabyte-sized bench models, and
        // generated in parallel chunks with their own streams, so it stays deterministic.
        let seed = rng.next_u64();
        let mut out = vec![0f32; n];
        out.par_chunks_mut(1 << 16)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut r = SplitMix64::new(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                for v in chunk {
                    let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                    *v = center + scale * 3f32.sqrt() * (2.0 * u - 1.0);
                }
            });
        Ok(out)
    }
}

pub fn model_from_config(config: ModelConfig, seed: u64, source: &str) -> Result<Model> {
    let weights = arch::load_weights(&config, &SyntheticTensors { seed }, WeightForm::F32)?;
    Ok(Model {
        config,
        weights,
        tokenizer: Tokenizer::Bytes,
        source: source.to_string(),
    })
}

/// A Mixtral-shaped model for benchmarks: hidden 1024, ffn 3584, 8 experts top-2, vocab
/// 32000 (the shape of the llama.cpp comparison in docs/BENCHMARKS.md), with `layers` layers.
pub fn mixtral_bench_config(layers: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: 32000,
        hidden_size: 1024,
        num_layers: layers,
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 128,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: 3584,
        expert_ffn: 3584,
        word_embed_proj_dim: 1024,
        rope_theta: Some(1e6),
        bos_token_id: Some(1),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: vec![2],
        ..default_config()
    }
}

/// SmolLM2-135M's shape (30 layers, hidden 576, 9 heads over 3 KV heads, ffn 1536, vocab
/// 49152, tied embeddings) upcycled to 4 experts with top-2 routing: a deep, narrow MoE of
/// 373 M parameters (379 MiB as llama.cpp's Q8_0).
pub fn smol_moe_config() -> ModelConfig {
    let layers = 30;
    ModelConfig {
        vocab_size: 49152,
        hidden_size: 576,
        num_layers: layers,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        max_position_embeddings: 8192,
        rope_theta: Some(100000.0),
        tie_word_embeddings: true,
        layer_ffn: vec![FfnKind::Moe; layers],
        dense_ffn: 1536,
        num_experts: 4,
        expert_ffn: 1536,
        word_embed_proj_dim: 576,
        bos_token_id: Some(1),
        ffn_hadamard_block: None,
        head_transform: false,
        qk_norm: None,
        clip_qkv: None,
        options: Default::default(),
        eos_token_ids: vec![2],
        ..default_config()
    }
}

/// Built-in models by name: `default` (small, byte tokenizer), `mixtral-bench` (4 layers,
/// 1.4 GB f32), `mixtral-1g` (12 layers, > 1 GB of int8 expert weights once quantized) and
/// `smol-moe` (30 layers, hidden 576, 4 experts: see [`smol_moe_config`]).
pub fn builtin(name: &str) -> Result<Model> {
    let config = match name {
        "default" => default_config(),
        "mixtral-bench" => mixtral_bench_config(4),
        "mixtral-1g" => mixtral_bench_config(12),
        "smol-moe" => smol_moe_config(),
        other => {
            return Err(crate::error::Error::invalid(format!(
                "unknown built-in model `{other}` (trained, default, mixtral-bench, mixtral-1g, smol-moe)"
            )))
        }
    };
    model_from_config(config, 0x0edc_e0e0, &format!("builtin:{name}"))
}

pub fn default_model() -> Model {
    // The default config is valid by construction, so loading cannot fail.
    model_from_config(default_config(), 0x0edc_e0e0, "builtin:default")
        .expect("built-in default model")
}
