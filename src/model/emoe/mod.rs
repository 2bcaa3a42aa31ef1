//! The .emoe store: one memory-mapped file that holds a quantized model.
//!
//! Layout (integers little-endian, offsets absolute from the start of the file):
//!
//! ```text
//! [magic "EDGEMOE\0" 8 B][version u32][header_len u64][header crc32c u32][header JSON, header_len B]
//! zero padding to a multiple of BLOCK_ALIGN
//! non-expert data region: tensors, each TENSOR_ALIGN-aligned      one crc32c, checked at open
//! zero padding to a multiple of BLOCK_ALIGN
//! expert blocks, each BLOCK_ALIGN-aligned: one expert's tensors   one crc32c each, checked on
//!   (int8 weights, scales, smoothing factors), TENSOR_ALIGN-aligned   first access
//! ```
//!
//! The header JSON holds the model config, the embedded tokenizer.json, the quantization method
//! and parameters, the data region, a tensor directory (name, dtype, shape, offset, len, block)
//! and the expert-block directory. All tensors of one expert share one block so a single read
//! (or, later, one DMA) pages the whole expert in. [`parse_header`] validates every offset and
//! length with checked arithmetic before a byte of tensor data is touched, after checking the
//! header's checksum and validating the embedded config as config.json is; see `format.rs`.
//! Whether the tensor table is the one the config implies is checked where a model is built from
//! the file (`Model::load_emoe`).

mod format;
mod reader;
mod table;
mod writer;

pub use format::{
    parse_header, DataRegion, ExpertBlockEntry, Header, TensorEntry, MAX_HEADER_BYTES,
    PREAMBLE_LEN, TENSOR_ALIGN,
};
pub use reader::{EmoeFile, TensorView};
pub use table::load_checked;
pub use writer::{EmoeWriter, WriteSummary};

use crate::model::buf::{bytes_of, Plain};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub const MAGIC: [u8; 8] = *b"EDGEMOE\0";
/// Version 2 stores int8 matrices exactly as the CPU kernels read them (rows padded to 64
/// bytes, f32 scales, i32 row sums), so they are used in place from the map; version 3 adds the
/// header JSON's CRC-32C to the preamble, so every byte the reader trusts is checksummed;
/// version 4 adds U8 tensors: int4 weights in the kernels' tiled layout (`model::int4`). A
/// file without them is still written as version 3, so older readers open it.
pub const VERSION: u32 = 4;
/// The newest version a file without U8 tensors needs.
pub const VERSION_WITHOUT_INT4: u32 = 3;
/// Alignment of the data region and of every expert block: a page, so a block maps, reads and
/// DMAs as whole pages.
pub const BLOCK_ALIGN: u64 = 4096;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmoeDtype {
    F32,
    F16,
    BF16,
    I8,
    I32,
    /// Bytes: packed int4 weights and their zero points (version 4).
    U8,
}

impl EmoeDtype {
    pub fn size(self) -> usize {
        match self {
            EmoeDtype::F32 | EmoeDtype::I32 => 4,
            EmoeDtype::F16 | EmoeDtype::BF16 => 2,
            EmoeDtype::I8 | EmoeDtype::U8 => 1,
        }
    }
}

/// One tensor handed to [`EmoeWriter`]: little-endian bytes, `numel × dtype.size()` long.
#[derive(Debug, Clone)]
pub struct TensorData<'a> {
    pub name: String,
    pub dtype: EmoeDtype,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> TensorData<'a> {
    /// The values' own bytes, borrowed where the host is little-endian (as the format is), so
    /// writing a model holds no second copy of it.
    pub fn borrowed<T: Plain + LeBytes>(
        name: impl Into<String>,
        dtype: EmoeDtype,
        shape: Vec<usize>,
        values: &'a [T],
    ) -> Self {
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let bytes = if cfg!(target_endian = "little") {
            Cow::Borrowed(bytes_of(values))
        } else {
            Cow::Owned(values.iter().flat_map(|v| v.le_bytes()).collect())
        };
        TensorData {
            name: name.into(),
            dtype,
            shape,
            bytes,
        }
    }
}

/// A number's little-endian bytes (for big-endian hosts, where a borrow would be wrong).
pub trait LeBytes {
    fn le_bytes(&self) -> Vec<u8>;
}

impl LeBytes for f32 {
    fn le_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl LeBytes for i32 {
    fn le_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl LeBytes for u8 {
    fn le_bytes(&self) -> Vec<u8> {
        vec![*self]
    }
}

impl LeBytes for u16 {
    fn le_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl LeBytes for i8 {
    fn le_bytes(&self) -> Vec<u8> {
        vec![*self as u8]
    }
}

impl TensorData<'static> {
    pub fn from_f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        TensorData {
            name: name.into(),
            dtype: EmoeDtype::F32,
            shape,
            bytes: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }
    }
}

/// What part of the model a tensor belongs to, for `edgemoe inspect` and the writer's summary.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TensorClass {
    Embeddings,
    Attention,
    Router,
    Experts,
    SharedExpert,
    Norms,
    Head,
    Other,
}

impl TensorClass {
    pub fn label(self) -> &'static str {
        match self {
            TensorClass::Embeddings => "embeddings",
            TensorClass::Attention => "attention",
            TensorClass::Router => "router",
            TensorClass::Experts => "experts",
            TensorClass::SharedExpert => "shared expert",
            TensorClass::Norms => "norms",
            TensorClass::Head => "head",
            TensorClass::Other => "other",
        }
    }

    /// Classifies by Hugging Face tensor name (Mixtral, Qwen2-MoE, OPT); everything in an expert
    /// block is `Experts` whatever its name. Order matters: `self_attn_layer_norm` is a norm and
    /// `mlp.shared_expert_gate` is the shared expert, not the router.
    pub fn of(name: &str, in_expert_block: bool) -> TensorClass {
        let has = |s: &str| name.contains(s);
        if in_expert_block {
            TensorClass::Experts
        } else if has("shared_expert") {
            TensorClass::SharedExpert
        } else if has("norm.transform") {
            // What the head reads the final norm through (a tied, rotated head).
            TensorClass::Head
        } else if has("norm") {
            TensorClass::Norms
        } else if has("embed_tokens") || has("embed_positions") || has("project_in") {
            TensorClass::Embeddings
        } else if has("lm_head") || has("project_out") {
            TensorClass::Head
        } else if has("block_sparse_moe.gate.") || has("mlp.gate.") || has("router") {
            TensorClass::Router
        } else if has("experts.") {
            TensorClass::Experts
        } else if has("attn") || has("attention") {
            TensorClass::Attention
        } else {
            TensorClass::Other
        }
    }
}

/// Bytes and parameters of one tensor class.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct ClassStats {
    pub tensors: usize,
    pub bytes: u64,
    /// Elements of the class's I8 tensors: the quantized weights.
    pub int8_params: u64,
    /// Weights held by the class's int4 tensors (two per byte of a `qweight4`).
    pub int4_params: u64,
}

impl ClassStats {
    /// All bytes of the class (int8 weights, scales, smoothing factors, …) per int8 weight;
    /// `None` for a class with no int8 tensors.
    pub fn bytes_per_int8_param(&self) -> Option<f64> {
        (self.int8_params > 0).then(|| self.bytes as f64 / self.int8_params as f64)
    }

    /// All bytes of the class per quantized weight, int8 and int4 (padding counted as
    /// weights); `None` for a class with neither.
    pub fn bytes_per_quantized_param(&self) -> Option<f64> {
        let params = self.int8_params + self.int4_params;
        (params > 0).then(|| self.bytes as f64 / params as f64)
    }
}

/// Per-class totals, in [`TensorClass`] order.
#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct ClassTally(pub BTreeMap<TensorClass, ClassStats>);

impl ClassTally {
    pub fn add(&mut self, name: &str, dtype: EmoeDtype, numel: u64, bytes: u64, in_block: bool) {
        let s = self.0.entry(TensorClass::of(name, in_block)).or_default();
        s.tensors += 1;
        s.bytes = s.bytes.saturating_add(bytes);
        if dtype == EmoeDtype::I8 {
            s.int8_params = s.int8_params.saturating_add(numel);
        }
        if dtype == EmoeDtype::U8 && name.ends_with(".qweight4") {
            s.int4_params = s.int4_params.saturating_add(numel.saturating_mul(2));
        }
    }
}

/// `x` rounded up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    Some(x.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_up_rounds_and_reports_overflow() {
        assert_eq!(align_up(0, 4096), Some(0));
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(65, 64), Some(128));
        assert_eq!(align_up(u64::MAX, 64), None);
    }

    #[test]
    fn classifies_hf_names() {
        let cases = [
            ("model.embed_tokens.weight", TensorClass::Embeddings),
            (
                "model.decoder.embed_positions.weight",
                TensorClass::Embeddings,
            ),
            (
                "model.layers.0.self_attn.q_proj.weight",
                TensorClass::Attention,
            ),
            (
                "model.decoder.layers.0.self_attn_layer_norm.weight",
                TensorClass::Norms,
            ),
            ("model.layers.0.input_layernorm.weight", TensorClass::Norms),
            ("model.norm.weight", TensorClass::Norms),
            (
                "model.layers.0.block_sparse_moe.gate.weight",
                TensorClass::Router,
            ),
            ("model.layers.0.mlp.gate.weight", TensorClass::Router),
            (
                "model.layers.0.mlp.shared_expert.up_proj.weight",
                TensorClass::SharedExpert,
            ),
            (
                "model.layers.0.mlp.shared_expert_gate.weight",
                TensorClass::SharedExpert,
            ),
            ("model.layers.0.mlp.gate_proj.weight", TensorClass::Other),
            ("lm_head.weight", TensorClass::Head),
            ("model.norm.transform.weight", TensorClass::Head),
            (
                "model.layers.0.block_sparse_moe.experts.3.w1.weight",
                TensorClass::Experts,
            ),
        ];
        for (name, want) in cases {
            assert_eq!(TensorClass::of(name, false), want, "{name}");
        }
        assert_eq!(
            TensorClass::of("lm_head.weight", true),
            TensorClass::Experts
        );
    }
}
