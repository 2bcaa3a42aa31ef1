//! A validating reader for the safetensors format, over a memory map.
//!
//! Layout: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
//! and `[begin, end)` byte range relative to the data section, then the data. Every number in the
//! header is checked with checked arithmetic before any byte is read: the ranges must lie inside
//! the file, match dtype × shape, and tile the data section without gaps or overlaps (as the
//! reference implementation requires). Tensors need not be aligned: reads copy and convert.

use crate::error::{Error, Result};
use crate::model::buf::{Buf, HalfKind, Plain, SharedMap};
use crate::model::weights::Stored;
use memmap2::Mmap;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Headers larger than this are rejected before allocation (the reference reader uses 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F64" => Dtype::F64,
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I64" => Dtype::I64,
            "I32" => Dtype::I32,
            "I16" => Dtype::I16,
            "I8" => Dtype::I8,
            "U8" => Dtype::U8,
            "BOOL" => Dtype::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range inside the mapped file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub struct SafetensorsFile {
    path: PathBuf,
    map: SharedMap,
    tensors: BTreeMap<String, TensorInfo>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Arc<SafetensorsFile>> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and we never hand out references that outlive `self`;
        // a checkpoint rewritten underneath a running process is outside what we can defend.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_map(path, Arc::new(map))
    }

    /// A safetensors file already in memory (the embedded built-in model); `path` names it in
    /// errors and reports.
    pub fn from_map(path: &Path, map: SharedMap) -> Result<Arc<SafetensorsFile>> {
        let tensors = parse_header(&map).map_err(|reason| Error::Safetensors {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Arc::new(SafetensorsFile {
            path: path.to_path_buf(),
            map,
            tensors,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        // In bounds: parse_header checked start <= end <= map.len().
        &self.map[info.start..info.end]
    }

    /// A tensor as stored: F32, BF16 and F16 in place where aligned (copied otherwise), U8 in
    /// place (GPT-OSS's MXFP4 blocks and exponents); F64 narrowed to f32.
    pub fn stored(&self, name: &str) -> Result<Stored> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let n = info.numel();
        Ok(match info.dtype {
            Dtype::F32 => Stored::F32(self.in_place(info, n, crate::model::convert::f32s)),
            Dtype::BF16 => Stored::Half(HalfKind::Bf16, self.in_place(info, n, u16s)),
            Dtype::F16 => Stored::Half(HalfKind::F16, self.in_place(info, n, u16s)),
            Dtype::U8 => Stored::U8(self.in_place(info, n, <[u8]>::to_vec)),
            _ => Stored::F32(self.read_f32(name)?.into()),
        })
    }

    /// `n` values in place, or decoded by `copy` when the bytes are not aligned for `T`.
    fn in_place<T: Plain>(&self, info: &TensorInfo, n: usize, copy: fn(&[u8]) -> Vec<T>) -> Buf<T> {
        Buf::mapped(&self.map, info.start, n).unwrap_or_else(|| copy(self.bytes(info)).into())
    }

    /// Reads a floating-point tensor as f32, converting from f16/bf16/f64.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let bytes = self.bytes(info);
        let out = match info.dtype {
            Dtype::F32 => crate::model::convert::f32s(bytes),
            Dtype::F16 => crate::model::convert::f16s(bytes),
            Dtype::BF16 => crate::model::convert::bf16s(bytes),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    f64::from_le_bytes(a) as f32
                })
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(out)
    }

    /// Reads an integer tensor as i64 (used for reference token ids).
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })?;
        let bytes = self.bytes(info);
        Ok(match info.dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    i64::from_le_bytes(a)
                })
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            other => {
                return Err(Error::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// Parses and validates the header; the error string names the offending tensor or field.
pub fn parse_header(file: &[u8]) -> std::result::Result<BTreeMap<String, TensorInfo>, String> {
    if file.len() < 8 {
        return Err(format!(
            "file is {} bytes, shorter than the 8-byte header length",
            file.len()
        ));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&file[..8]);
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        ));
    }
    let header_end = 8usize
        .checked_add(header_len as usize)
        .ok_or("header length overflows")?;
    if header_end > file.len() {
        return Err(format!(
            "header length {header_len} points past the end of the {}-byte file (truncated?)",
            file.len()
        ));
    }
    let header = std::str::from_utf8(&file[8..header_end])
        .map_err(|_| "header is not valid UTF-8".to_string())?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(header).map_err(|e| format!("header is not valid JSON: {e}"))?;

    let data_len = file.len() - header_end;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let entry: RawEntry = serde_json::from_value(value)
            .map_err(|e| format!("tensor `{name}`: malformed entry: {e}"))?;
        let dtype = Dtype::parse(&entry.dtype)
            .ok_or_else(|| format!("tensor `{name}`: unknown dtype {}", entry.dtype))?;
        let [begin, end] = entry.data_offsets;
        let numel = entry
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} overflows", entry.shape))?;
        let nbytes = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| format!("tensor `{name}`: byte size overflows"))?;
        if begin > end || end - begin != nbytes {
            return Err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] do not match {dtype:?} {:?} ({nbytes} bytes)",
                entry.shape
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}`: data_offsets end {end} points past the end of the data ({data_len} bytes; truncated?)"
            ));
        }
        tensors.insert(
            name,
            TensorInfo {
                dtype,
                shape: entry.shape,
                start: header_end + begin,
                end: header_end + end,
            },
        );
    }
    check_tiling(&tensors, header_end, file.len())?;
    Ok(tensors)
}

/// The data ranges must cover the data section exactly, without gaps or overlaps.
fn check_tiling(
    tensors: &BTreeMap<String, TensorInfo>,
    data_start: usize,
    file_len: usize,
) -> std::result::Result<(), String> {
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    ranges.sort();
    let mut cursor = data_start;
    for (start, end, name) in ranges {
        if start != cursor {
            return Err(format!(
                "tensor `{name}` starts at data offset {} but the previous tensor ends at {} (gap or overlap)",
                start - data_start,
                cursor - data_start
            ));
        }
        cursor = end;
    }
    if cursor != file_len {
        return Err(format!(
            "{} trailing bytes after the last tensor",
            file_len - cursor
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_valid_file() {
        let f = file_with(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#,
            &[0; 8],
        );
        let t = parse_header(&f).unwrap();
        assert_eq!(t["a"].shape, vec![2]);
    }

    #[test]
    fn rejects_bad_headers() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "shorter than"),
            (
                {
                    let mut v = 1000u64.to_le_bytes().to_vec();
                    v.extend_from_slice(b"{}");
                    v
                },
                "past the end",
            ),
            ((u64::MAX).to_le_bytes().to_vec(), "exceeds"),
            (file_with("{not json", &[]), "not valid JSON"),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    &[0; 8],
                ),
                "past the end of the data",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "do not match",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    &[0; 8],
                ),
                "gap or overlap",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"Q9","shape":[1],"data_offsets":[0,1]}}"#,
                    &[0; 1],
                ),
                "unknown dtype",
            ),
            (
                file_with(
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                    &[0; 8],
                ),
                "overflows",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse_header(&bytes).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
