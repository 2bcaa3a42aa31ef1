//! The GGUF header: magic, version, counts, metadata key/values and tensor infos, parsed with
//! checked arithmetic. Nothing is allocated from a count before the count is checked against a cap
//! and against the bytes left in the file, so a hostile header fails with a message, never a
//! panic or an allocation of its claimed size.

use super::types::GgmlType;
use std::collections::BTreeMap;

/// The bytes `GGUF` at offset 0.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the file does not say.
pub const DEFAULT_ALIGNMENT: usize = 32;
/// Caps on what a header may claim (llama.cpp's largest real files stay far below them).
pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_KVS: u64 = 1 << 20;
pub const MAX_STRING_BYTES: u64 = 64 << 20;
pub const MAX_ARRAY_LEN: u64 = 1 << 22;
const MAX_ARRAY_DEPTH: usize = 4;
/// GGML_MAX_DIMS.
pub const MAX_DIMS: u32 = 4;
const MAX_ALIGNMENT: usize = 1 << 20;

/// One metadata value (GGUF value types 0–12).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl Value {
    /// A non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Dimensions innermost first, as GGUF stores them (`ne`): a PyTorch `[out, in]` weight has
    /// `dims = [in, out]`.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range inside the file.
    pub start: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (outermost first).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

#[derive(Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub alignment: usize,
    /// Where the data section starts (the end of the tensor infos, aligned).
    pub data_start: usize,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Res<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Res<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "{} needs {n} bytes at offset {}, but the file ends at {} (truncated?)",
                what(),
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Res<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Res<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Res<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Res<String> {
        let len = self.u64(&|| format!("the length of {}", what()))?;
        if len > MAX_STRING_BYTES || len > self.remaining() as u64 {
            return Err(format!(
                "{} claims a {len}-byte string at offset {} ({} bytes left, cap {MAX_STRING_BYTES})",
                what(),
                self.pos,
                self.remaining()
            ));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{} is not valid UTF-8", what()))
    }

    /// A value of GGUF type `ty`; arrays nest at most [`MAX_ARRAY_DEPTH`] deep.
    fn value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Res<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{}: bool byte {b} is neither 0 nor 1", what())),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!(
                        "{}: arrays nested deeper than {MAX_ARRAY_DEPTH}",
                        what()
                    ));
                }
                let elem = self.u32(&|| format!("the element type of {}", what()))?;
                let count = self.u64(&|| format!("the length of {}", what()))?;
                let min = min_value_bytes(elem)
                    .ok_or_else(|| format!("{}: unknown array element type {elem}", what()))?;
                if count > MAX_ARRAY_LEN || count.saturating_mul(min) > self.remaining() as u64 {
                    return Err(format!(
                        "{} claims {count} elements at offset {} ({} bytes left, cap {MAX_ARRAY_LEN})",
                        what(),
                        self.pos,
                        self.remaining()
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for i in 0..count {
                    items.push(self.value(elem, depth + 1, &|| format!("{}[{i}]", what()))?);
                }
                Value::Array(items)
            }
            10 => Value::U64(u64::from_le_bytes(self.array(what)?)),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{}: unknown value type {other}", what())),
        })
    }
}

/// The fewest bytes a value of type `ty` takes (to bound array lengths by the file's size).
fn min_value_bytes(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,
        9 => 12,
        _ => return None,
    })
}

/// Parses and validates the header of a GGUF file held in `file`; the error names the field,
/// key or tensor at fault.
pub fn parse(file: &[u8]) -> Res<Header> {
    let mut c = Cursor { buf: file, pos: 0 };
    let magic = c.array::<4>(&|| "the magic".into())?;
    if &magic != MAGIC {
        let hint = if &magic == b"FUGG" {
            " (a big-endian GGUF, which is not supported)"
        } else {
            ""
        };
        return Err(format!("bad magic {magic:02x?}: expected \"GGUF\"{hint}"));
    }
    let version = c.u32(&|| "the version".into())?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (only 2 and 3)"
        ));
    }
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    let n_kvs = c.u64(&|| "the metadata count".into())?;
    // Each tensor info takes at least 8 (name) + 4 + 8 (one dim) + 4 + 8 bytes; each KV 8 + 4 + 1.
    if n_tensors > MAX_TENSORS || n_tensors.saturating_mul(32) > c.remaining() as u64 {
        return Err(format!(
            "tensor count {n_tensors} is impossible for a {}-byte file (cap {MAX_TENSORS})",
            file.len()
        ));
    }
    if n_kvs > MAX_KVS || n_kvs.saturating_mul(13) > c.remaining() as u64 {
        return Err(format!(
            "metadata count {n_kvs} is impossible for a {}-byte file (cap {MAX_KVS})",
            file.len()
        ));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kvs {
        let key = c.string(&|| format!("the key of metadata entry {i}"))?;
        let ty = c.u32(&|| format!("the type of `{key}`"))?;
        let value = c.value(ty, 0, &|| format!("`{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a as usize <= MAX_ALIGNMENT => a as usize,
            _ => {
                return Err(format!(
                    "general.alignment {v:?} is not a power of two up to {MAX_ALIGNMENT}"
                ))
            }
        },
    };

    let mut infos = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.string(&|| format!("the name of tensor {i}"))?;
        let n_dims = c.u32(&|| format!("the dimension count of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}`: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let v = c.u64(&|| format!("dimension {d} of `{name}`"))?;
            let v = usize::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("tensor `{name}`: dimension {d} is {v}"))?;
            dims.push(v);
        }
        let ty_id = c.u32(&|| format!("the type of `{name}`"))?;
        let ty = GgmlType::from_id(ty_id)
            .ok_or_else(|| format!("tensor `{name}`: unknown ggml type id {ty_id}"))?;
        let offset = c.u64(&|| format!("the data offset of `{name}`"))?;
        infos.push((name, dims, ty, offset));
    }
    let data_start = c
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or("data offset overflows")?;
    if n_tensors > 0 && data_start > file.len() {
        return Err(format!(
            "the data section would start at {data_start}, past the end of the {}-byte file (truncated?)",
            file.len()
        ));
    }

    let mut tensors = BTreeMap::new();
    for (name, dims, ty, offset) in infos {
        let numel = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: dims {dims:?} overflow"))?;
        let (block, block_bytes) = ty.block();
        if dims[0] % block != 0 {
            return Err(format!(
                "tensor `{name}`: first dimension {} is not a multiple of {}'s block of {block}",
                dims[0],
                ty.name()
            ));
        }
        let nbytes = (numel / block)
            .checked_mul(block_bytes)
            .ok_or_else(|| format!("tensor `{name}`: byte size overflows"))?;
        if offset % alignment as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| data_start.checked_add(o))
            .ok_or_else(|| format!("tensor `{name}`: data offset {offset} overflows"))?;
        let end = start
            .checked_add(nbytes)
            .filter(|&e| e <= file.len())
            .ok_or_else(|| {
                format!(
                    "tensor `{name}` ({} {dims:?}, {nbytes} bytes at data offset {offset}) runs past the end of the {}-byte file (truncated?)",
                    ty.name(),
                    file.len()
                )
            })?;
        let info = TensorInfo {
            dims,
            ty,
            start,
            end,
        };
        if tensors.insert(name.clone(), info).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
    }
    let mut ranges: Vec<(usize, usize, &str)> = tensors
        .iter()
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    ranges.sort();
    for w in ranges.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(format!(
                "tensors `{}` and `{}` overlap in the file",
                w[0].2, w[1].2
            ));
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}
