//! GGUF files (llama.cpp's single-file format) read directly, over a memory map.
//!
//! Layout (v2/v3, little-endian): `GGUF`, a u32 version, u64 tensor and metadata counts, the
//! metadata key/values, one info per tensor (name, dims innermost first, ggml type, offset into
//! the data section), then the data section at the next multiple of `general.alignment` (32 by
//! default). [`parse`] validates every count, length and offset before use.
//!
//! As a [`TensorSource`] the file answers to the Hugging Face names the architecture loaders
//! ask for (`model.layers.0.self_attn.q_proj.weight` is `blk.0.attn_q.weight`; expert `e` of a
//! MoE layer is slice `e` of the stacked `blk.N.ffn_gate_exps.weight`). F32, F16 and BF16
//! tensors are used in place. Quantized matrices (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
//! Q6_K, MXFP4) are handed to the loader as [`BlockMatrix`]es, still in the map: a direct run
//! converts each to int8 at load, `quantize` decodes one at a time (see [`blocks`]); quantized
//! vectors are dequantized to f32 on reading. llama.cpp's converter permutes the rows of a
//! Llama's (Mixtral's, Granite-MoE's) q and k projections for ggml's interleaved RoPE;
//! edgemoe's RoPE rotates halves as transformers does, so those rows are put back in Hugging
//! Face order here. Qwen2-MoE, Qwen3-MoE, OLMoE, GLM-4-MoE and GPT-OSS use NeoX RoPE in
//! llama.cpp and are stored unpermuted; DeepSeek's rotated dims are interleaved in both.
//! Names per architecture are [`names`]'s; DeepSeek's split `kv_b_proj` is joined by `mla`;
//! configs are read by `llama` (Llama, Mixtral, Qwen, OLMoE) and `families` (Granite, GLM,
//! DeepSeek, GPT-OSS); the tokenizer is rebuilt by `llama`, with `pretok` (what each
//! `tokenizer.ggml.pre` name stands for) and `spm` (SentencePiece vocabularies).

pub mod blocks;
mod families;
pub(crate) mod llama;
mod mla;
pub mod names;
pub mod parse;
mod pretok;
mod spm;
pub(crate) mod types;

pub use names::{gguf_expert, gguf_name, gguf_name_in};

use crate::error::{Error, Result};
use crate::model::buf::{Buf, HalfKind, Plain, SharedMap};
use crate::model::weights::{Stored, TensorSource};
use blocks::BlockMatrix;
use memmap2::Mmap;
use parse::{Header, TensorInfo, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use types::GgmlType;

pub struct GgufFile {
    path: PathBuf,
    map: SharedMap,
    header: Header,
    /// `general.architecture`.
    arch: String,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        if let Some(what) = crate::model::buf::not_mappable(path) {
            return Err(Error::Gguf {
                path: path.to_path_buf(),
                reason: what.into(),
            });
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and every view of it holds the Arc; a file rewritten
        // underneath a running process is outside what we can defend.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_map(path, Arc::new(map))
    }

    pub fn from_map(path: &Path, map: SharedMap) -> Result<GgufFile> {
        let header = parse::parse(&map).map_err(|reason| Error::Gguf {
            path: path.to_path_buf(),
            reason,
        })?;
        let arch = match header.metadata.get("general.architecture") {
            Some(Value::Str(s)) => s.clone(),
            Some(v) => {
                return Err(Error::Gguf {
                    path: path.to_path_buf(),
                    reason: format!("general.architecture is a {}, not a string", v.type_name()),
                })
            }
            None => String::new(),
        };
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            header,
            arch,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn alignment(&self) -> usize {
        self.header.alignment
    }

    /// `general.architecture` (empty when absent).
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.header.metadata
    }

    /// Forgets the `tokenizer.ggml.*` keys (once the tokenizer is built) and gives their
    /// bytes' file pages back.
    pub fn drop_tokenizer_metadata(&mut self) {
        self.header
            .metadata
            .retain(|k, _| !k.starts_with("tokenizer.ggml."));
        crate::model::buf::release_pages(&self.map, 0, self.header.data_start);
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.header.metadata.get(key)
    }

    /// Tensors by their GGUF names.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.header.tensors
    }

    pub fn info(&self, gguf_name: &str) -> Option<&TensorInfo> {
        self.header.tensors.get(gguf_name)
    }

    pub(crate) fn error(&self, reason: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        // In bounds: parse checked start <= end <= map.len().
        &self.map[info.start..info.end]
    }

    /// A tensor by its GGUF name, as stored: F32/F16/BF16 in place where aligned (copied
    /// otherwise), quantized types dequantized to f32.
    pub fn read(&self, gguf_name: &str) -> Result<Stored> {
        let info = self.info(gguf_name).ok_or_else(|| Error::MissingTensor {
            name: gguf_name.to_string(),
        })?;
        let n = info.numel();
        let bytes = self.bytes(info);
        Ok(match info.ty.id() {
            types::F32 => Stored::F32(self.in_place(info, n, crate::model::convert::f32s)),
            types::F16 => Stored::Half(HalfKind::F16, self.in_place(info, n, u16s)),
            types::BF16 => Stored::Half(HalfKind::Bf16, self.in_place(info, n, u16s)),
            _ => match types::dequantize(info.ty, bytes) {
                Some(v) => Stored::F32(v.into()),
                None => return Err(self.unsupported(gguf_name, info.ty)),
            },
        })
    }

    fn unsupported(&self, name: &str, ty: GgmlType) -> Error {
        self.error(format!(
            "tensor `{name}` has ggml type {}, which edgemoe cannot read (supported: {})",
            ty.name(),
            types::SUPPORTED
        ))
    }

    fn in_place<T: Plain>(&self, info: &TensorInfo, n: usize, copy: fn(&[u8]) -> Vec<T>) -> Buf<T> {
        Buf::mapped(&self.map, info.start, n).unwrap_or_else(|| copy(self.bytes(info)).into())
    }

    /// For a Llama's (or Granite's) q/k projection (GGUF name), the head count its rows were
    /// permuted with.
    fn rope_permuted_heads(&self, gguf_name: &str) -> Option<usize> {
        // The converters that permute: LlamaModel and its Granite subclasses.
        if !matches!(self.arch.as_str(), "llama" | "granitemoe") {
            return None;
        }
        let key = if gguf_name.ends_with(".attn_q.weight") || gguf_name.ends_with(".attn_q.bias") {
            "attention.head_count"
        } else if gguf_name.ends_with(".attn_k.weight") || gguf_name.ends_with(".attn_k.bias") {
            "attention.head_count_kv"
        } else {
            return None;
        };
        let arch = &self.arch;
        let heads = self.get(&format!("{arch}.{key}"));
        let heads = heads.or_else(|| self.get(&format!("{arch}.attention.head_count")));
        heads.and_then(Value::as_u64).map(|h| h as usize)
    }
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Undoes llama.cpp's `permute` of a q/k projection: within each of `heads` heads, GGUF row
/// `2i + j` (i < head_dim/2, j < 2) is Hugging Face row `j·head_dim/2 + i`. `rows` is a
/// row-major `[out, cols]` matrix (or a bias, `cols = 1`).
pub fn unpermute_rows<T: Copy>(v: &[T], heads: usize, cols: usize) -> Option<Vec<T>> {
    let out = v.len().checked_div(cols)?;
    if heads == 0 || !out.is_multiple_of(heads) || !(out / heads).is_multiple_of(2) {
        return None;
    }
    let (hd, half) = (out / heads, out / heads / 2);
    let mut dst = Vec::with_capacity(v.len());
    for h in 0..heads {
        for j in 0..2 {
            for i in 0..half {
                let src = (h * hd + 2 * i + j) * cols;
                dst.extend_from_slice(&v[src..src + cols]);
            }
        }
    }
    Some(dst)
}

/// Where a Hugging Face tensor lies in the file: a whole GGUF tensor or one expert's slice of
/// a stacked one.
struct View {
    gguf: String,
    ty: GgmlType,
    start: usize,
    end: usize,
    shape: Vec<usize>,
}

/// A shape without its outermost 1s (`[1, h]` and `[h]` are the same vector).
fn squeezed(shape: &[usize]) -> &[usize] {
    let ones = shape.iter().take_while(|&&d| d == 1).count();
    &shape[ones.min(shape.len().saturating_sub(1))..]
}

impl GgufFile {
    /// The GGUF tensor (and expert) behind Hugging Face name `hf`.
    fn locate(&self, hf: &str) -> Option<(String, Option<usize>)> {
        if let Some(g) = gguf_name_in(&self.arch, hf) {
            return self.info(&g).is_some().then_some((g, None));
        }
        let (stacked, e, legacy) = gguf_expert(hf)?;
        if self.info(&stacked).is_some() {
            Some((stacked, Some(e)))
        } else {
            self.info(&legacy).is_some().then_some((legacy, None))
        }
    }

    /// `hf`'s bytes, checked against `shape`.
    fn view(&self, hf: &str, shape: &[usize], why: &str) -> Result<View> {
        let missing = || match gguf_name_in(&self.arch, hf).or_else(|| gguf_expert(hf).map(|e| e.0))
        {
            Some(g) => self.error(format!("no tensor `{g}` (asked for as `{hf}`)")),
            None => Error::MissingTensor {
                name: hf.to_string(),
            },
        };
        let (g, expert) = self.locate(hf).ok_or_else(missing)?;
        let info = self.info(&g).ok_or_else(missing)?;
        let mut actual = info.shape();
        let (mut start, mut end) = (info.start, info.end);
        if let Some(e) = expert {
            let n = actual[0];
            if e >= n || actual.len() < 2 {
                return Err(self.error(format!(
                    "`{hf}`: expert {e}, but `{g}` {actual:?} holds {n} experts"
                )));
            }
            // Blocks run along the innermost dim, so each expert's bytes are one slice.
            let per = (end - start) / n;
            start += e * per;
            end = start + per;
            actual.remove(0);
        }
        if squeezed(&actual) != squeezed(shape) {
            return Err(Error::ShapeMismatch {
                name: g,
                expected: shape.to_vec(),
                actual,
                why: format!("`{hf}`, from GGUF metadata {why}"),
            });
        }
        Ok(View {
            gguf: g,
            ty: info.ty,
            start,
            end,
            shape: shape.to_vec(),
        })
    }
}

impl TensorSource for GgufFile {
    fn has(&self, name: &str) -> bool {
        self.locate(name).is_some() || self.split_kv_b(name).is_some()
    }

    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored> {
        if let Some(joined) = self.joined_kv_b(name, shape, why)? {
            return Ok(joined);
        }
        let v = self.view(name, shape, why)?;
        let n: usize = v.shape.iter().product();
        let bytes = &self.map[v.start..v.end];
        let stored = match v.ty.id() {
            types::F32 => Stored::F32(
                Buf::mapped(&self.map, v.start, n)
                    .unwrap_or_else(|| crate::model::convert::f32s(bytes).into()),
            ),
            types::F16 | types::BF16 => {
                let kind = if v.ty.id() == types::F16 {
                    HalfKind::F16
                } else {
                    HalfKind::Bf16
                };
                let b = Buf::mapped(&self.map, v.start, n).unwrap_or_else(|| u16s(bytes).into());
                Stored::Half(kind, b)
            }
            _ => match types::dequantize(v.ty, bytes) {
                Some(x) => Stored::F32(x.into()),
                None => return Err(self.unsupported(&v.gguf, v.ty)),
            },
        };
        let Some(heads) = self.rope_permuted_heads(&v.gguf) else {
            return Ok(stored);
        };
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let bad = || self.uneven_heads(&v.gguf, shape[0], heads);
        Ok(match stored {
            Stored::F32(b) => Stored::F32(unpermute_rows(&b, heads, cols).ok_or_else(bad)?.into()),
            Stored::Half(k, b) => {
                Stored::Half(k, unpermute_rows(&b, heads, cols).ok_or_else(bad)?.into())
            }
            other => other,
        })
    }

    fn blocks(&self, name: &str, shape: &[usize], why: &str) -> Result<Option<Arc<BlockMatrix>>> {
        if self.split_kv_b(name).is_some() {
            // Rebuilt by `stored` (quantized halves are decoded there).
            return Ok(None);
        }
        let v = self.view(name, shape, why)?;
        if !v.ty.is_dequantizable() || shape.len() != 2 {
            return Ok(None);
        }
        let heads = self.rope_permuted_heads(&v.gguf);
        let b = BlockMatrix::new(self.map.clone(), v.start, (shape[0], shape[1]), v.ty, heads);
        b.map(|b| Some(Arc::new(b))).ok_or_else(|| {
            self.error(format!(
                "tensor `{}` ({} {shape:?}) is not a matrix of whole blocks{}",
                v.gguf,
                v.ty.name(),
                heads.map_or(String::new(), |h| format!(" in {h} heads of an even size"))
            ))
        })
    }
}

impl GgufFile {
    fn uneven_heads(&self, g: &str, rows: usize, heads: usize) -> Error {
        self.error(format!(
            "tensor `{g}`: {rows} rows do not split into {heads} heads of an even size"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute (reshape to [heads, 2, hd/2], swap the last two) then ours is the
    /// identity.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, hd, cols) = (3, 8, 2);
        let out = heads * hd;
        let hf: Vec<usize> = (0..out * cols).collect();
        let mut gguf = vec![0; out * cols];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let (src, dst) = (h * hd + j * hd / 2 + i, h * hd + 2 * i + j);
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, heads, cols).unwrap(), hf);
        assert!(unpermute_rows(&gguf, 5, cols).is_none());
    }
}
