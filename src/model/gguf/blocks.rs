//! A quantized GGUF matrix (Q8_0, Q4_K, MXFP4, …) where it lies in the file's map, decoded a
//! row at a time: never as a whole f32 tensor unless asked ([`BlockMatrix::to_rows`]).
//!
//! What the loader makes of one (`weights::Loader`): a direct run converts it at load into the
//! engine's per-row int8 ([`BlockMatrix::to_int8`], streaming a few rows at a time, then
//! giving the file pages back); `quantize` keeps it as it is in the map until the layer that
//! holds it is quantized, then decodes that one matrix to f32 (the [`PreparedMatrix`] rows).

use super::types::{dequantize_into, GgmlType};
use crate::model::buf::{release_pages, SharedMap};
use crate::model::int8::{Int8Error, Int8Matrix};
use crate::model::weights::PreparedMatrix;
use std::any::Any;

/// Rows decoded together while converting to int8 (bounds the f32 scratch).
const CHUNK_ROWS: usize = 64;

#[derive(Debug)]
pub struct BlockMatrix {
    map: SharedMap,
    /// Absolute byte offset of stored row 0, and bytes per row.
    start: usize,
    row_bytes: usize,
    rows: usize,
    cols: usize,
    ty: GgmlType,
    /// llama.cpp permuted a Llama's q/k rows over this many heads (undone on decoding).
    permuted_heads: Option<usize>,
}

impl BlockMatrix {
    /// `rows × cols` values of `ty` from byte `start` of `map`; `None` when `cols` is not whole
    /// blocks, the bytes run past the map, or the rows do not split into `permuted_heads`
    /// heads of an even size.
    pub fn new(
        map: SharedMap,
        start: usize,
        (rows, cols): (usize, usize),
        ty: GgmlType,
        permuted_heads: Option<usize>,
    ) -> Option<BlockMatrix> {
        let row_bytes = ty.bytes_for(cols)?;
        let end = row_bytes.checked_mul(rows)?.checked_add(start)?;
        if !ty.is_dequantizable() || end > map.len() {
            return None;
        }
        if let Some(h) = permuted_heads {
            if h == 0 || !rows.is_multiple_of(h) || !(rows / h).is_multiple_of(2) {
                return None;
            }
        }
        Some(BlockMatrix {
            map,
            start,
            row_bytes,
            rows,
            cols,
            ty,
            permuted_heads,
        })
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The stored row holding Hugging Face row `r`: within a head of `hd` rows, HF row
    /// `j·hd/2 + i` is stored as row `2i + j` (llama.cpp's permute for interleaved RoPE).
    fn stored_row(&self, r: usize) -> usize {
        match self.permuted_heads {
            None => r,
            Some(heads) => {
                let hd = self.rows / heads;
                let (head, rem) = (r / hd, r % hd);
                let (j, i) = (rem / (hd / 2), rem % (hd / 2));
                head * hd + 2 * i + j
            }
        }
    }

    /// Decodes Hugging Face row `r` into `out` (`cols` values).
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let at = self.start + self.stored_row(r) * self.row_bytes;
        // In bounds and whole blocks: checked in `new`.
        let ok = dequantize_into(self.ty, &self.map[at..at + self.row_bytes], out);
        debug_assert!(ok);
    }

    /// Every row in f32, row-major `[rows, cols]` (one tensor's worth: the quantizer's input).
    pub fn to_rows(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.decode_row(r, row);
        }
        out
    }

    /// The engine's int8 form: per-row symmetric round to nearest (`quantize --method rtn`'s
    /// rows, scales rounded to f16 as an .emoe stores them), decoded [`CHUNK_ROWS`] rows at a
    /// time. Then the file pages are given back, so a converted model holds only its int8.
    pub fn to_int8(&self) -> Result<Int8Matrix, Int8Error> {
        let (n, k) = (self.rows, self.cols);
        let mut data = Vec::new();
        let mut scales = Vec::with_capacity(n);
        let mut row_sums = Vec::with_capacity(n);
        let mut scratch = vec![0f32; CHUNK_ROWS.min(n) * k];
        for first in (0..n).step_by(CHUNK_ROWS) {
            let count = CHUNK_ROWS.min(n - first);
            let buf = &mut scratch[..count * k];
            for (i, row) in buf.chunks_exact_mut(k).enumerate() {
                self.decode_row(first + i, row);
            }
            if self.permuted_heads.is_none() {
                // Read once: their pages go back now, not after the whole tensor.
                let at = self.start + first * self.row_bytes;
                release_pages(&self.map, at, count * self.row_bytes);
            }
            let part = Int8Matrix::quantize_rtn(buf, count, k).map_err(|e| match e {
                Int8Error::NonFinite { what, row } => Int8Error::NonFinite {
                    what,
                    row: first + row,
                },
                other => other,
            })?;
            if data.is_empty() {
                data.reserve_exact(n * part.k_padded);
            }
            data.extend_from_slice(&part.data);
            scales.extend(part.scales.iter().map(|&s| half::f16::from_f32(s).to_f32()));
            row_sums.extend_from_slice(&part.row_sums);
        }
        self.release();
        Int8Matrix::from_parts(n, k, data.into(), scales.into(), row_sums.into())
    }

    /// Gives the matrix's file pages back to the OS (they read back unchanged if touched).
    pub fn release(&self) {
        release_pages(&self.map, self.start, self.rows * self.row_bytes);
    }
}

impl PreparedMatrix for BlockMatrix {
    fn to_rows(&self) -> Vec<f32> {
        BlockMatrix::to_rows(self)
    }

    fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    fn row_read_bytes(&self) -> usize {
        self.row_bytes
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::types::{GgmlType, Q8_0};

    /// Q8_0 rows whose block b of row r has d = 2^-(r+1) and q = b·8 + i - 16.
    fn q8_map(rows: usize, cols: usize) -> (SharedMap, Vec<f32>) {
        let mut bytes = vec![];
        let mut want = vec![];
        for r in 0..rows {
            let d = half::f16::from_f32(0.5f32.powi(r as i32 + 1));
            for b in 0..cols / 32 {
                bytes.extend(d.to_le_bytes());
                for i in 0..32 {
                    let q = ((b * 8 + i) % 64) as i8 - 16;
                    bytes.push(q as u8);
                    want.push(f32::from(q) * d.to_f32());
                }
            }
        }
        (crate::model::buf::map_copy_of(&bytes).unwrap(), want)
    }

    #[test]
    fn rows_decode_and_unpermute() {
        let q8 = GgmlType::from_id(Q8_0).unwrap();
        let (map, want) = q8_map(8, 64);
        let m = BlockMatrix::new(map.clone(), 0, (8, 64), q8, None).unwrap();
        assert_eq!(m.to_rows(), want);
        // Two heads of 4 rows: HF row 1 (j = 0, i = 1) is stored row 2.
        let p = BlockMatrix::new(map.clone(), 0, (8, 64), q8, Some(2)).unwrap();
        let rows = p.to_rows();
        let perm = crate::model::gguf::unpermute_rows(&want, 2, 64).unwrap();
        assert_eq!(rows, perm);
        assert!(BlockMatrix::new(map.clone(), 0, (8, 64), q8, Some(3)).is_none());
        assert!(BlockMatrix::new(map.clone(), 0, (8, 48), q8, None).is_none());
        assert!(BlockMatrix::new(map, 34, (8, 64), q8, None).is_none());
    }

    /// Chunked conversion equals the quantizer's RTN of the whole decoded matrix.
    #[test]
    fn int8_matches_rtn_of_the_decoded_rows() {
        let q8 = GgmlType::from_id(Q8_0).unwrap();
        let (map, want) = q8_map(CHUNK_ROWS + 5, 64);
        let m = BlockMatrix::new(map, 0, (CHUNK_ROWS + 5, 64), q8, None).unwrap();
        let got = m.to_int8().unwrap();
        let mut rtn = Int8Matrix::quantize_rtn(&want, CHUNK_ROWS + 5, 64).unwrap();
        for s in rtn.scales.make_mut() {
            *s = half::f16::from_f32(*s).to_f32();
        }
        assert_eq!(got, rtn);
        got.validate().unwrap();
    }
}
