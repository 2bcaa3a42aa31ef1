//! What a model is: its configuration, weights and tokenizer, loaded from a Hugging Face
//! checkpoint directory or generated (the built-in default).

pub mod arch;
pub mod buf;
pub mod config;
pub(crate) mod convert;
pub mod embedded;
pub mod emoe;
pub mod export;
pub mod gguf;
pub mod hf;
pub mod int4;
pub mod int8;
pub mod rotation;
pub mod safetensors;
pub mod synthetic;
pub mod tokenizer;
pub mod weights;
pub mod yarn;

use crate::error::{Error, Result};
use config::ModelConfig;
use std::path::Path;
use tokenizer::Tokenizer;
use weights::{Ffn, WeightForm, Weights};

/// Where a model's weights live (see [`Model::weight_memory`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WeightMemory {
    /// Bytes in memory the process owns (anonymous: counted in RSS, never paged out).
    pub owned_bytes: usize,
    /// Bytes used in place from memory-mapped files.
    pub mapped_bytes: usize,
    /// Mapped bytes whose pages are in the page cache now (clean file pages the OS may drop).
    pub mapped_resident_bytes: usize,
}

/// A loaded model: its configuration, weights (in the layout the kernels read) and tokenizer.
/// Load one with [`crate::load_model`].
pub struct Model {
    /// The architecture and its sizes (from config.json or the file's metadata).
    pub config: ModelConfig,
    /// Every tensor, as stored or quantized.
    pub weights: Weights,
    /// Text to token ids and back.
    pub tokenizer: Tokenizer,
    /// Where it came from, for reports.
    pub source: String,
}

impl Model {
    /// Loads a checkpoint directory (config.json, safetensors, tokenizer.json), a .gguf file or an
    /// .emoe file,
    /// weights as stored where the kernels read that layout (mapped, not copied).
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_as(path, WeightForm::AsStored)
    }

    /// [`Self::load`] with every floating-point weight of a checkpoint widened to f32 (what the
    /// quantizer edits).
    pub fn load_f32(path: &Path) -> Result<Model> {
        Self::load_as(path, WeightForm::F32)
    }

    /// [`Self::load`] with f32 matrices also left in the file, unpacked: what the quantizer
    /// reads a layer at a time (not a form the engine runs fast).
    pub fn load_in_place(path: &Path) -> Result<Model> {
        Self::load_as(path, WeightForm::InPlace)
    }

    fn load_as(path: &Path, form: WeightForm) -> Result<Model> {
        if !path.exists() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Self::load_gguf(path, form);
        }
        if !path.is_dir() {
            return Self::load_emoe(path);
        }
        if !path.join("config.json").exists() {
            return Err(Error::invalid(format!(
                "{}: not a checkpoint directory: it has no config.json (a checkpoint directory holds config.json, model.safetensors or shards with model.safetensors.index.json, and tokenizer.json)",
                path.display()
            )));
        }
        let config = hf::HfCheckpoint::config(path)?;
        let tokenizer = Tokenizer::from_file(&path.join("tokenizer.json"))?;
        let ckpt = hf::HfCheckpoint::open(path)?;
        let weights = arch::load_weights(&config, &ckpt, form)?;
        Ok(Model {
            config,
            weights,
            tokenizer,
            source: path.display().to_string(),
        })
    }

    /// Loads a GGUF file: config and tokenizer from its metadata, F32/F16/BF16 tensors in
    /// place, quantized ones (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, MXFP4) as `form` says:
    /// converted at load to weight-only int8 rows, a matrix at a time ([`WeightForm::AsStored`]),
    /// left in the map for the quantizer ([`WeightForm::InPlace`]) or decoded to f32.
    pub fn load_gguf(path: &Path, form: WeightForm) -> Result<Model> {
        let mut file = gguf::GgufFile::open(path)?;
        let config = file.config()?;
        let tokenizer = file.tokenizer()?;
        // The vocabulary's strings, and what building the tokenizer left free, go back before
        // the weights are converted (a small model's peak RSS is mostly these).
        file.drop_tokenizer_metadata();
        crate::util::memory::trim_heap();
        let weights = arch::load_weights(&config, &file, form)?;
        Ok(Model {
            config,
            weights,
            tokenizer,
            source: path.display().to_string(),
        })
    }

    /// Loads a quantized .emoe store (config and tokenizer are embedded); the tensor table must
    /// be exactly what the config implies.
    pub fn load_emoe(path: &Path) -> Result<Model> {
        let file = emoe::EmoeFile::open(path)?;
        let config = file.config().clone();
        let tokenizer = match file.tokenizer_json() {
            "" => Tokenizer::Bytes,
            json => Tokenizer::from_json_bytes(json.as_bytes(), path)?,
        };
        let weights = emoe::load_checked(&file, &config)?;
        Ok(Model {
            config,
            weights,
            tokenizer,
            source: path.display().to_string(),
        })
    }

    /// The built-in default: a small Mixtral generated deterministically, byte-level tokenizer.
    pub fn builtin_default() -> Model {
        synthetic::default_model()
    }

    /// Parameters stored (embeddings and head counted once when tied).
    pub fn num_params(&self) -> usize {
        let w = &self.weights;
        let mut n = w.embed.num_params() + w.lm_head.as_ref().map_or(0, |l| l.num_params());
        n += w.positions.as_ref().map_or(0, Vec::len);
        n += [&w.project_in, &w.head_transform, &w.project_out]
            .into_iter()
            .flatten()
            .map(|l| l.num_params())
            .sum::<usize>();
        n + w
            .layers
            .iter()
            .map(|l| layer_params(l, usize::MAX))
            .sum::<usize>()
    }

    /// Bytes of all weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let w = &self.weights;
        let lin = |l: &weights::Linear| l.weight_bytes();
        let mut n = lin(&w.embed) + w.lm_head.as_ref().map_or(0, lin);
        n += w.positions.as_ref().map_or(0, |p| p.len() * 4);
        n += [&w.project_in, &w.head_transform, &w.project_out]
            .into_iter()
            .flatten()
            .map(lin)
            .sum::<usize>();
        for l in &w.layers {
            n += l.attn.weight_bytes();
            let mlp = weights::GatedMlp::weight_bytes;
            n += match &l.ffn {
                Ffn::Moe(b) => {
                    lin(&b.router)
                        + b.experts.iter().map(mlp).sum::<usize>()
                        + b.shared
                            .as_ref()
                            .map_or(0, |s| mlp(&s.mlp) + s.gate.as_ref().map_or(0, lin))
                }
                Ffn::Gated(m) => mlp(m),
                Ffn::Plain(m) => lin(&m.fc1) + lin(&m.fc2),
            };
        }
        n
    }

    /// Where the weights live: bytes the process owns, bytes of mapped files they use in place,
    /// and how many of those mapped bytes are resident now.
    pub fn weight_memory(&self) -> WeightMemory {
        let mut m = WeightMemory::default();
        // Per map, its ranges, so pages shared by neighbouring tensors count once.
        let mut ranges: Vec<(&buf::SharedMap, usize, usize)> = Vec::new();
        self.weights.visit_storage(&mut |s| match s {
            weights::Storage::Owned(n) => m.owned_bytes += n,
            weights::Storage::Mapped(map, offset, len) => {
                m.mapped_bytes += len;
                ranges.push((map, offset, len));
            }
        });
        ranges.sort_by_key(|r| (std::sync::Arc::as_ptr(r.0) as usize, r.1));
        let mut merged: Vec<(&buf::SharedMap, usize, usize)> = Vec::new();
        for (map, at, len) in ranges {
            match merged.last_mut() {
                Some((m0, a0, l0)) if std::sync::Arc::ptr_eq(m0, map) && at <= *a0 + *l0 + 4096 => {
                    *l0 = (*l0).max(at + len - *a0);
                }
                _ => merged.push((map, at, len)),
            }
        }
        m.mapped_resident_bytes = merged
            .iter()
            .filter_map(|(map, at, len)| {
                crate::util::memory::resident_bytes(map.as_ptr().wrapping_add(*at), *len)
            })
            .sum();
        m
    }

    /// Parameters one token uses: only `top_k` of the routed experts.
    pub fn active_params(&self) -> usize {
        let w = &self.weights;
        let all: usize = w.layers.iter().map(|l| layer_params(l, usize::MAX)).sum();
        let active: usize = w
            .layers
            .iter()
            .map(|l| layer_params(l, self.config.top_k))
            .sum();
        self.num_params() - all + active
    }
}

fn layer_params(l: &weights::Layer, experts: usize) -> usize {
    let attn: usize = l.attn.projections().iter().map(|p| p.num_params()).sum();
    let mlp = |m: &weights::GatedMlp| m.gate.num_params() + m.up.num_params() + m.down.num_params();
    let ffn = match &l.ffn {
        Ffn::Moe(b) => {
            let per = b.experts.first().map_or(0, mlp);
            b.router.num_params()
                + per * b.experts.len().min(experts)
                + b.shared.as_ref().map_or(0, |s| {
                    mlp(&s.mlp) + s.gate.as_ref().map_or(0, weights::Linear::num_params)
                })
        }
        Ffn::Gated(m) => mlp(m),
        Ffn::Plain(m) => m.fc1.num_params() + m.fc2.num_params(),
    };
    attn + ffn
}
