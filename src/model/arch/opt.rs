//! OPT (<https://arxiv.org/abs/2205.01068>), the dense model the SmoothQuant/GPTQ papers measure:
//! learned positions (offset by 2), LayerNorm with bias, attention and ReLU MLP with biases,
//! pre-norm or post-norm (OPT-350m) blocks, optional project_in/out around the decoder when the
//! embedding width differs, and a head tied to the embeddings. Names follow OPTForCausalLM.

use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::{
    Attention, Ffn, Layer, Loader, PlainMlp, TensorSource, WeightForm, Weights,
};

/// OPTLearnedPositionalEmbedding keeps two extra rows in front: position p uses row p + 2.
pub const POSITION_OFFSET: usize = 2;

pub fn load(cfg: &ModelConfig, src: &dyn TensorSource, form: WeightForm) -> Result<Weights> {
    let l = Loader { src, form };
    // Hub OPT checkpoints name tensors `decoder.*`, transformers' own saves `model.decoder.*`;
    // a quantized store may hold the (tied) table as `qweight`.
    let root = if ["weight", "qweight"]
        .iter()
        .any(|w| l.src.has(&format!("model.decoder.embed_tokens.{w}")))
    {
        "model.decoder"
    } else {
        "decoder"
    };
    let (h, e, b) = (cfg.hidden_size, cfg.word_embed_proj_dim, cfg.attention_bias);
    let layers = (0..cfg.num_layers)
        .map(|i| {
            let p = format!("{root}.layers.{i}");
            let a = format!("{p}.self_attn");
            let why = "hidden_size × hidden_size";
            Ok(Layer {
                attn_norm: l.layer_norm(&format!("{p}.self_attn_layer_norm"), h, cfg.norm_eps)?,
                attn: Attention {
                    q: l.linear(&format!("{a}.q_proj"), h, h, b, why)?,
                    k: l.linear(&format!("{a}.k_proj"), h, h, b, why)?,
                    v: l.linear(&format!("{a}.v_proj"), h, h, b, why)?,
                    o: l.linear(&format!("{a}.out_proj"), h, h, b, why)?,
                    qk_norm: None,
                    sinks: None,
                    latent: None,
                },
                ffn_norm: l.layer_norm(&format!("{p}.final_layer_norm"), h, cfg.norm_eps)?,
                ffn: Ffn::Plain(PlainMlp {
                    fc1: l.linear(
                        &format!("{p}.fc1"),
                        cfg.dense_ffn,
                        h,
                        b,
                        "ffn_dim × hidden_size",
                    )?,
                    fc2: l.linear(
                        &format!("{p}.fc2"),
                        h,
                        cfg.dense_ffn,
                        b,
                        "hidden_size × ffn_dim",
                    )?,
                }),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let projected = e != h;
    Ok(Weights {
        embed: l.embedding(
            &format!("{root}.embed_tokens"),
            cfg.vocab_size,
            e,
            "vocab_size × word_embed_proj_dim",
        )?,
        positions: Some(l.src.tensor(
            &format!("{root}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET, h],
            "max_position_embeddings + 2 × hidden_size",
        )?),
        project_in: if projected {
            Some(l.linear(
                &format!("{root}.project_in"),
                h,
                e,
                false,
                "hidden_size × word_embed_proj_dim",
            )?)
        } else {
            None
        },
        layers,
        final_norm: if cfg.final_norm {
            Some(l.layer_norm(&format!("{root}.final_layer_norm"), h, cfg.norm_eps)?)
        } else {
            None
        },
        head_transform: None,
        project_out: if projected {
            Some(l.linear(
                &format!("{root}.project_out"),
                e,
                h,
                false,
                "word_embed_proj_dim × hidden_size",
            )?)
        } else {
            None
        },
        lm_head: if cfg.tie_word_embeddings {
            None
        } else {
            Some(l.linear(
                "lm_head",
                cfg.vocab_size,
                e,
                false,
                "vocab_size × word_embed_proj_dim",
            )?)
        },
    })
}
