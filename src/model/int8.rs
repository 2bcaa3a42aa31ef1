//! Int8 weights as edgemoe stores them (the `.emoe` layout): one row per output channel, zero
//! padded to a multiple of [`K_ALIGN`] values, a symmetric f32 scale per row and the row's sum.
//! Kernels read this layout in place (mapped from the file); this module only describes and
//! checks it: the products are the backends' (the CPU backend's int8 kernels are the reference).

use crate::model::buf::Buf;
use std::fmt;

/// Rows of an [`Int8Matrix`] (and the kernels' quantized activations) are zero padded to a
/// multiple of this.
pub const K_ALIGN: usize = 64;
/// Largest k whose worst-case dot product (`k·127·127`) still fits in an i32.
pub const MAX_K: usize = (i32::MAX / (127 * 127)) as usize;
/// `k` rounded up to a multiple of [`K_ALIGN`].
pub fn padded_k(k: usize) -> usize {
    k.div_ceil(K_ALIGN) * K_ALIGN
}

/// Errors from building int8 data out of external input.
#[derive(Clone, Debug, PartialEq)]
pub enum Int8Error {
    /// A buffer's length disagrees with the shape given with it.
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    /// `n * k` does not fit in `usize`.
    ShapeOverflow { n: usize, k: usize },
    /// `k` is above [`MAX_K`], where i32 accumulation could overflow.
    KTooLarge { k: usize },
    /// A weight of -128: the kernels need values in `[-127, 127]`.
    WeightOutOfRange { row: usize, col: usize },
    /// An inf/NaN weight or scale.
    NonFinite { what: &'static str, row: usize },
    /// A stored row's padding is not zero.
    Padding { row: usize, col: usize },
    /// A stored row sum disagrees with its row.
    RowSum { row: usize },
}

impl fmt::Display for Int8Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Length {
                what,
                expected,
                actual,
            } => write!(f, "{what}: expected {expected} values, got {actual}"),
            Self::ShapeOverflow { n, k } => write!(f, "int8 matrix {n}x{k} is too large"),
            Self::KTooLarge { k } => write!(f, "k = {k} exceeds the int8 kernels' limit {MAX_K}"),
            Self::WeightOutOfRange { row, col } => {
                write!(
                    f,
                    "int8 weight [{row}][{col}] is -128; expected [-127, 127]"
                )
            }
            Self::NonFinite { what, row } => write!(f, "non-finite {what} in row {row}"),
            Self::Padding { row, col } => {
                write!(f, "int8 row {row} has a non-zero pad value at column {col}")
            }
            Self::RowSum { row } => write!(f, "int8 row {row}: stored row sum does not match"),
        }
    }
}

impl std::error::Error for Int8Error {}
/// Int8 weights, one row per output channel, symmetric per-channel scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Matrix {
    pub n: usize,
    pub k: usize,
    pub k_padded: usize,
    /// `n` rows of `k_padded` values, row-major, zero padded; values in `[-127, 127]`. Owned,
    /// or in place in a mapped .emoe (which stores exactly this layout).
    pub data: Buf<i8>,
    /// One scale per output channel.
    pub scales: Buf<f32>,
    /// `Σ_k data[j][k]`, for the VNNI tier's u8-shift correction.
    pub row_sums: Buf<i32>,
}

impl Int8Matrix {
    /// Pads `data_unpadded` (`n × k`, row-major) and computes the row sums.
    pub fn from_quantized(
        n: usize,
        k: usize,
        data_unpadded: &[i8],
        scales: Vec<f32>,
    ) -> Result<Self, Int8Error> {
        check_matrix_shape(n, k, data_unpadded.len(), "int8 weights")?;
        if scales.len() != n {
            return Err(Int8Error::Length {
                what: "weight scales",
                expected: n,
                actual: scales.len(),
            });
        }
        if let Some(row) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Int8Error::NonFinite {
                what: "weight scale",
                row,
            });
        }
        let k_padded = padded_k(k);
        let mut data = vec![0i8; n * k_padded];
        let mut row_sums = vec![0i32; n];
        for j in 0..n {
            let src = &data_unpadded[j * k..(j + 1) * k];
            if let Some(col) = src.iter().position(|&v| v == i8::MIN) {
                return Err(Int8Error::WeightOutOfRange { row: j, col });
            }
            data[j * k_padded..j * k_padded + k].copy_from_slice(src);
            // Cannot overflow: k ≤ MAX_K and |v| ≤ 127.
            row_sums[j] = src.iter().map(|&v| i32::from(v)).sum();
        }
        Ok(Self {
            n,
            k,
            k_padded,
            data: data.into(),
            scales: scales.into(),
            row_sums: row_sums.into(),
        })
    }

    /// A matrix over stored parts already in the kernels' layout (`n × padded_k(k)` values,
    /// `n` scales, `n` row sums), checking only their lengths: nothing is read, so mapped
    /// parts stay unread until used. Call [`Self::validate`] before the first product.
    pub fn from_parts(
        n: usize,
        k: usize,
        data: Buf<i8>,
        scales: Buf<f32>,
        row_sums: Buf<i32>,
    ) -> Result<Self, Int8Error> {
        let k_padded = padded_k(k);
        check_matrix_shape(n, k_padded, data.len(), "padded int8 weights")?;
        if k > MAX_K {
            return Err(Int8Error::KTooLarge { k });
        }
        for (what, len) in [
            ("weight scales", scales.len()),
            ("row sums", row_sums.len()),
        ] {
            if len != n {
                return Err(Int8Error::Length {
                    what,
                    expected: n,
                    actual: len,
                });
            }
        }
        Ok(Self {
            n,
            k,
            k_padded,
            data,
            scales,
            row_sums,
        })
    }

    /// Checks what the kernels rely on: values in `[-127, 127]`, zero padding, row sums that
    /// match the rows, finite scales. Wrong values would give wrong numbers, never unsafety,
    /// but a corrupt file must fail loudly.
    pub fn validate(&self) -> Result<(), Int8Error> {
        if let Some(row) = self.scales.iter().position(|s| !s.is_finite()) {
            return Err(Int8Error::NonFinite {
                what: "weight scale",
                row,
            });
        }
        let (data, sums): (&[i8], &[i32]) = (&self.data, &self.row_sums);
        for (j, row) in data.chunks_exact(self.k_padded.max(1)).enumerate() {
            // One pass that vectorizes: the sum and whether any value is -128; where, only
            // when it is.
            let (sum, has_min) = row.iter().fold((0i32, false), |(s, m), &v| {
                (s + i32::from(v), m | (v == i8::MIN))
            });
            if has_min {
                let col = row.iter().position(|&v| v == i8::MIN).unwrap_or(0);
                return Err(Int8Error::WeightOutOfRange { row: j, col });
            }
            if let Some(col) = row[self.k..].iter().position(|&v| v != 0) {
                return Err(Int8Error::Padding {
                    row: j,
                    col: self.k + col,
                });
            }
            if sum != sums[j] {
                return Err(Int8Error::RowSum { row: j });
            }
        }
        Ok(())
    }

    /// Bytes of the weights, scales and row sums.
    pub fn bytes(&self) -> usize {
        self.data.byte_len() + self.scales.byte_len() + self.row_sums.byte_len()
    }

    /// Output channel `j`'s row, padding included.
    pub fn row(&self, j: usize) -> &[i8] {
        &self.data[j * self.k_padded..(j + 1) * self.k_padded]
    }
}

pub(crate) fn check_matrix_shape(
    n: usize,
    k: usize,
    len: usize,
    what: &'static str,
) -> Result<(), Int8Error> {
    if k > MAX_K {
        return Err(Int8Error::KTooLarge { k });
    }
    let expected = n
        .checked_mul(padded_k(k))
        .map(|_| n * k)
        .ok_or(Int8Error::ShapeOverflow { n, k })?;
    if len != expected {
        return Err(Int8Error::Length {
            what,
            expected,
            actual: len,
        });
    }
    Ok(())
}
