//! What a GGUF file says besides its tensors: the model config (from `{arch}.*` metadata,
//! llama.cpp's key names, for `llama` — Mixtral when it has `llama.expert_count` —, `qwen2moe`,
//! `qwen3moe` and `olmoe`; the other families in `families`) and the tokenizer (from `tokenizer.ggml.*`), rebuilt as a
//! `tokenizers` tokenizer.json so it runs, and embeds in an .emoe, like a checkpoint's.

use super::parse::Value;
use super::pretok;
use super::GgufFile;
use crate::error::{Error, Result};
use crate::model::config::{Architecture, FfnKind, ModelConfig, QkNorm};
use crate::model::tokenizer::Tokenizer;
use serde_json::{json, Map};

impl GgufFile {
    pub(super) fn key_error(&self, key: &str, reason: impl Into<String>) -> Error {
        Error::config(&self.path, key, reason)
    }

    pub(super) fn uint(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| {
                    self.key_error(
                        key,
                        format!("expected an unsigned integer, got a {}", v.type_name()),
                    )
                }),
            None => default.ok_or_else(|| self.key_error(key, "missing")),
        }
    }

    pub(super) fn positive(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.uint(key, default)? {
            0 => Err(self.key_error(key, "must be positive")),
            v => Ok(v),
        }
    }

    pub(super) fn float(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| {
                self.key_error(key, format!("expected a number, got a {}", v.type_name()))
            }),
            None => Ok(default),
        }
    }

    pub(super) fn token_id(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| self.key_error(key, "expected a token id")),
        }
    }

    pub(super) fn strings(&self, key: &str) -> Result<Option<Vec<&str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(Value::as_str)
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.key_error(key, "expected an array of strings")),
            Some(v) => {
                Err(self.key_error(key, format!("expected an array, got a {}", v.type_name())))
            }
        }
    }

    pub(super) fn flag(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().ok_or_else(|| {
                self.key_error(key, format!("expected a bool, got a {}", v.type_name()))
            }),
            None => Ok(default),
        }
    }

    /// The vocabulary's size: the token list's, else `{arch}.vocab_size`.
    pub(super) fn vocab_size(&self) -> Result<usize> {
        match self.strings("tokenizer.ggml.tokens")? {
            Some(t) if !t.is_empty() => Ok(t.len()),
            _ => self.positive(&format!("{}.vocab_size", self.architecture()), None),
        }
    }

    /// The stop ids: end of sequence, then end of turn where it differs.
    pub(super) fn eos_ids(&self) -> Result<Vec<u32>> {
        let ids = [
            self.token_id("tokenizer.ggml.eos_token_id")?,
            self.token_id("tokenizer.ggml.eot_token_id")?,
        ];
        Ok(ids.into_iter().flatten().fold(Vec::new(), |mut v, id| {
            if !v.contains(&id) {
                v.push(id);
            }
            v
        }))
    }

    /// The model config the metadata describes: `general.architecture` `llama` (Mixtral when
    /// `llama.expert_count` is set), `qwen2moe`, `qwen3moe` or `olmoe` here; `granitemoe`,
    /// `glm4moe`, `deepseek2` and `gpt-oss` by `families`.
    pub fn config(&self) -> Result<ModelConfig> {
        if let Some(cfg) = self.family_config()? {
            return Ok(cfg);
        }
        let name = self.architecture();
        let k = |s: &str| format!("{name}.{s}");
        let arch = match name {
            "llama" if self.uint(&k("expert_count"), Some(0))? > 0 => Architecture::Mixtral,
            "llama" => Architecture::Llama,
            "qwen2moe" => Architecture::Qwen2Moe,
            "qwen3moe" => Architecture::Qwen3Moe,
            "olmoe" => Architecture::Olmoe,
            _ => {
                return Err(Error::UnknownArchitecture {
                    path: self.path.clone(),
                    name: format!(
                        "{name} (GGUF general.architecture; supported: llama, qwen2moe, qwen3moe, olmoe, \
                         granitemoe, glm4moe, deepseek2, gpt-oss)"
                    ),
                })
            }
        };
        let hidden = self.positive(&k("embedding_length"), None)?;
        let layers = self.positive(&k("block_count"), None)?;
        // Checked before `dense_llama` sizes its per-layer table by it.
        if layers > crate::model::config::MAX_LAYERS {
            return Err(self.key_error(
                &k("block_count"),
                format!(
                    "{layers} is more than {} layers",
                    crate::model::config::MAX_LAYERS
                ),
            ));
        }
        let heads = self.positive(&k("attention.head_count"), None)?;
        let kv = self.positive(&k("attention.head_count_kv"), Some(heads))?;
        let default_hd = (hidden % heads == 0).then_some(hidden / heads);
        let head_dim = self.positive(&k("attention.key_length"), default_hd)?;
        let value_dim = self.positive(&k("attention.value_length"), Some(head_dim))?;
        if value_dim != head_dim {
            return Err(self.key_error(&k("attention.value_length"), "must equal key_length"));
        }
        let rot = self.positive(&k("rope.dimension_count"), Some(head_dim))?;
        if rot != head_dim {
            return Err(self.key_error(
                &k("rope.dimension_count"),
                format!("{rot}: partial rotary embeddings (head_dim {head_dim}) are not supported"),
            ));
        }
        if let Some(v) = self.get(&k("rope.scaling.type")) {
            if v.as_str() != Some("none") {
                return Err(self.key_error(
                    &k("rope.scaling.type"),
                    format!("{v:?}: RoPE scaling is not supported"),
                ));
            }
        }
        let vocab = self.vocab_size()?;
        let eos = self.eos_ids()?;
        let mut cfg = ModelConfig {
            vocab_size: vocab,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            max_position_embeddings: self.positive(&k("context_length"), Some(2048))?,
            norm_eps: self.float(&k("attention.layer_norm_rms_epsilon"), 1e-5)?,
            rope_theta: Some(self.float(&k("rope.freq_base"), 10000.0)?),
            tie_word_embeddings: self.info("output.weight").is_none(),
            bos_token_id: self.token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: eos,
            ..ModelConfig::dense_llama(hidden, layers, 0)
        };
        if arch == Architecture::Llama {
            cfg.dense_ffn = self.positive(&k("feed_forward_length"), None)?;
        } else {
            self.moe_config(&mut cfg, arch)?;
        }
        cfg.validate(&self.path)?;
        Ok(cfg)
    }

    /// The MoE fields: expert counts and widths from `{arch}.expert_*`; which layers route
    /// from their tensors (a layer with `ffn_gate_inp` has experts, one without is a dense
    /// MLP, as Qwen's `mlp_only_layers` / `decoder_sparse_step` make); biases, q/k norms and
    /// the top-k renormalization as each family has them (llama.cpp's defaults where
    /// `{arch}.expert_weights_norm` is absent).
    fn moe_config(&self, cfg: &mut ModelConfig, arch: Architecture) -> Result<()> {
        let name = self.architecture();
        let k = |s: &str| format!("{name}.{s}");
        cfg.arch = arch;
        cfg.num_experts = self.positive(&k("expert_count"), None)?;
        cfg.top_k = self.positive(&k("expert_used_count"), None)?;
        let ffn = self.uint(&k("feed_forward_length"), Some(0))?;
        cfg.expert_ffn = self.positive(&k("expert_feed_forward_length"), Some(ffn))?;
        cfg.dense_ffn = ffn;
        cfg.layer_ffn = (0..cfg.num_layers)
            .map(
                |i| match self.info(&format!("blk.{i}.ffn_gate_inp.weight")) {
                    Some(_) => FfnKind::Moe,
                    None => FfnKind::DenseGated,
                },
            )
            .collect();
        let renormalize = matches!(arch, Architecture::Mixtral | Architecture::Qwen3Moe);
        cfg.norm_topk_prob = self.flag(&k("expert_weights_norm"), renormalize)?;
        let shared = self.uint(&k("expert_shared_feed_forward_length"), Some(0))?;
        cfg.shared_expert_ffn = (arch == Architecture::Qwen2Moe && shared > 0).then_some(shared);
        cfg.attention_bias = self.info("blk.0.attn_q.bias").is_some();
        cfg.qk_norm = match arch {
            Architecture::Qwen3Moe => Some(QkNorm::PerHead),
            Architecture::Olmoe => Some(QkNorm::Whole),
            _ => None,
        };
        if self.get(&k("attention.clamp_kqv")).is_some() {
            cfg.clip_qkv = Some(self.float(&k("attention.clamp_kqv"), 0.0)?);
        }
        if let Some(w) = self.get(&k("attention.sliding_window")) {
            let w = w.as_u64().and_then(|w| usize::try_from(w).ok());
            let w = w.ok_or_else(|| {
                self.key_error(
                    &k("attention.sliding_window"),
                    "expected an unsigned integer",
                )
            })?;
            cfg.sliding_window = (w > 0).then_some(w);
        }
        Ok(())
    }

    /// The tokenizer the metadata describes, as a tokenizer.json text.
    pub fn tokenizer_json(&self) -> Result<String> {
        let model = self.get("tokenizer.ggml.model").and_then(Value::as_str);
        match model {
            Some("gpt2") => self.byte_level_bpe_json(),
            Some("llama") => self.sentencepiece_bpe_json(),
            Some(other) => Err(self.key_error(
                "tokenizer.ggml.model",
                format!("tokenizer `{other}` is not supported yet (supported: gpt2, llama)"),
            )),
            None => {
                Err(self.key_error("tokenizer.ggml.model", "missing: the file has no tokenizer"))
            }
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        Tokenizer::from_json_bytes(self.tokenizer_json()?.as_bytes(), &self.path)
    }

    /// `tokenizer.ggml.token_type` (llama.cpp's: 1 normal, 2 unknown, 3 control, 4
    /// user-defined, 6 byte), one per token, or none.
    pub(super) fn token_types(&self, n: usize) -> Result<Vec<u64>> {
        let key = "tokenizer.ggml.token_type";
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(Value::as_u64)
                .collect::<Option<_>>()
                .ok_or_else(|| self.key_error(key, "expected integers")),
            Some(_) => Err(self.key_error(key, format!("expected an array of {n} integers"))),
        }
    }

    /// The post-processor that puts BOS first when `tokenizer.ggml.add_bos_token` (else
    /// `default`) says so; null otherwise.
    pub(super) fn bos_post_processor(
        &self,
        tokens: &[&str],
        default: bool,
    ) -> Result<serde_json::Value> {
        let add_bos = self
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(default);
        let bos = self.token_id("tokenizer.ggml.bos_token_id")?;
        Ok(match (add_bos, bos) {
            (true, Some(id)) => {
                let t = tokens.get(id as usize).ok_or_else(|| {
                    self.key_error("tokenizer.ggml.bos_token_id", "past the vocabulary")
                })?;
                let special = |type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
                let seq =
                    |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
                json!({"type": "TemplateProcessing",
                       "single": [special(0), seq("A", 0)],
                       "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
                       "special_tokens": {*t: {"id": t, "ids": [id], "tokens": [t]}}})
            }
            _ => serde_json::Value::Null,
        })
    }

    fn byte_level_bpe_json(&self) -> Result<String> {
        let tokens = self
            .strings("tokenizer.ggml.tokens")?
            .ok_or_else(|| self.key_error("tokenizer.ggml.tokens", "missing"))?;
        let merges = self.strings("tokenizer.ggml.merges")?.unwrap_or_default();
        let types = self.token_types(tokens.len())?;
        let alphabet = byte_alphabet();
        let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
        let mut vocab = Map::new();
        for (id, t) in tokens.iter().enumerate() {
            // Tokens outside the byte alphabet (rare, mislabelled) are respelled byte by byte.
            let t = if spelled(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            };
            vocab.entry(t).or_insert(json!(id));
        }
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        self.key_error(
                            "tokenizer.ggml.merges",
                            format!("merge {i} `{m}` has no space"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        // 3 = control (special), 4 = user-defined (matched whole, not special): llama.cpp's
        // token types.
        let added: Vec<_> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| (ty == 3 && spelled(t)) || ty == 4)
            .map(|(id, (t, &ty))| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": ty == 3})
            })
            .collect();
        let pre = self.get("tokenizer.ggml.pre").and_then(Value::as_str);
        let (normalizer, pre_tokenizer) = pretok::pre_tokenizer(pre).ok_or_else(|| {
            self.key_error(
                "tokenizer.ggml.pre",
                format!(
                    "pre-tokenizer `{}` is not supported yet (supported: {})",
                    pre.unwrap_or_default(),
                    pretok::SUPPORTED
                ),
            )
        })?;
        let post_processor = self.bos_post_processor(&tokens, false)?;
        let tok = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        Ok(tok.to_string())
    }
}

/// GPT-2's byte → character table: printable bytes stand for themselves, the rest map to
/// U+0100 onwards in byte order.
fn byte_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("below U+0200")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = super::byte_alphabet();
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }
}
