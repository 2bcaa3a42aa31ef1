//! Int4 weights as edgemoe stores them (`.emoe` version 4): the W4A8 experts' layout, read in
//! place by the kernels (`backend::cpu::int8::int4`).
//!
//! Values: `w[j][i] = scale[j][g] · (u[j][i] − zero[j][g])` with `u` an unsigned nibble in
//! `[0, 15]`, `g = i / group` (the group runs along the input dimension), an f16 scale per row
//! and group, and a zero point per row and group: 8 for every group of a symmetric matrix
//! (none stored), or stored as one byte (`[0, 15]`) per row and group (asymmetric).
//!
//! Layout: rows come in tiles of [`TILE_ROWS`] (the last tile zero padded), columns are padded
//! to [`Int4Matrix::k_padded`], a multiple of both the group and [`K_ALIGN`]. A tile is
//! `k_padded / 8` steps of 64 bytes; step `s` holds columns `8s..8s+8` of the tile's 16 rows:
//! byte `4r + c` has row `r`'s column `8s + c` in its low nibble and column `8s + 4 + c` in its
//! high nibble (`c < 4`). So one 64-byte load and two masks give, per row, four consecutive
//! columns in each 32-bit lane: a VNNI `dpbusd` against four broadcast activation bytes adds
//! each row's partial dot product into its own lane, and no horizontal sum is ever needed.
//! Scales (and zeros) are stored the same way: per tile, per group, 16 rows contiguous.

use crate::model::buf::Buf;
use crate::model::int8::{Int8Error, K_ALIGN, MAX_K};

/// Rows interleaved in one tile (one output lane each in the kernels).
pub const TILE_ROWS: usize = 16;
/// Columns per 64-byte step of a tile.
pub const STEP_K: usize = 8;
/// Bytes per step of a tile.
pub const STEP_BYTES: usize = TILE_ROWS * STEP_K / 2;
/// The zero point of a symmetric matrix.
pub const SYMMETRIC_ZERO: u8 = 8;
/// Group sizes the format allows (each divides or is a multiple of [`K_ALIGN`]).
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Errors from building or validating int4 data (reported as [`Int8Error`]'s cases where they
/// are the same, else as a message).
#[derive(Clone, Debug, PartialEq)]
pub enum Int4Error {
    Int8(Int8Error),
    /// A group size the format does not allow.
    Group(usize),
    /// A value or zero point above 15.
    Nibble {
        what: &'static str,
        row: usize,
    },
    /// A padding nibble (a padded row or column) that is not zero.
    Padding {
        row: usize,
        col: usize,
    },
    /// A scale that is not finite, or that f16 cannot hold.
    Scale {
        row: usize,
        group: usize,
    },
}

impl std::fmt::Display for Int4Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int8(e) => e.fmt(f),
            Self::Group(g) => write!(f, "int4 group size {g}; expected one of {GROUP_SIZES:?}"),
            Self::Nibble { what, row } => write!(f, "int4 {what} above 15 in row {row}"),
            Self::Padding { row, col } => {
                write!(f, "int4 padding at row {row}, column {col} is not zero")
            }
            Self::Scale { row, group } => write!(
                f,
                "int4 scale of row {row}, group {group} is not a finite f16 value"
            ),
        }
    }
}

impl std::error::Error for Int4Error {}

impl From<Int8Error> for Int4Error {
    fn from(e: Int8Error) -> Self {
        Self::Int8(e)
    }
}

/// Int4 weights in the tiled layout above.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Matrix {
    pub n: usize,
    pub k: usize,
    /// `k` rounded up to a multiple of `max(group, K_ALIGN)`.
    pub k_padded: usize,
    pub group: usize,
    /// `n_tiles × k_padded / STEP_K × STEP_BYTES` bytes.
    pub data: Buf<u8>,
    /// f16 bits, `n_tiles × groups × TILE_ROWS`.
    pub scales: Buf<u16>,
    /// `n_tiles × groups × TILE_ROWS` zero points; `None`: symmetric (every zero point 8).
    pub zeros: Option<Buf<u8>>,
}

/// `k` padded for int4 weights of group size `group`.
pub fn int4_padded_k(k: usize, group: usize) -> usize {
    k.div_ceil(group.max(K_ALIGN)) * group.max(K_ALIGN)
}

/// `v` rounded to the nearest f16 value, as the stored scales hold it.
pub fn round_scale(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

impl Int4Matrix {
    pub fn n_tiles(&self) -> usize {
        self.n.div_ceil(TILE_ROWS)
    }

    /// Groups per row, padding included.
    pub fn groups(&self) -> usize {
        self.k_padded / self.group
    }

    /// Bytes of one tile's values.
    pub fn tile_bytes(&self) -> usize {
        self.k_padded / STEP_K * STEP_BYTES
    }

    /// The lengths of data, scales and zeros for this shape.
    fn part_lens(n: usize, k_padded: usize, group: usize) -> (usize, usize) {
        let tiles = n.div_ceil(TILE_ROWS);
        (
            tiles * k_padded / 2 * TILE_ROWS,
            tiles * (k_padded / group) * TILE_ROWS,
        )
    }

    /// Packs `u` (`n × k` values in `[0, 15]`, row-major), `scales` and `zeros` (both
    /// `n × ceil(k / group)`, row-major; scales rounded to f16 here, so pass [`round_scale`]d
    /// values to get exactly what was quantized against). `zeros: None` is symmetric.
    pub fn from_quantized(
        n: usize,
        k: usize,
        group: usize,
        u: &[u8],
        scales: &[f32],
        zeros: Option<&[u8]>,
    ) -> Result<Self, Int4Error> {
        if !GROUP_SIZES.contains(&group) {
            return Err(Int4Error::Group(group));
        }
        crate::model::int8::check_matrix_shape(n, k, u.len(), "int4 values")?;
        let kg = k.div_ceil(group);
        for (what, len) in [
            ("int4 scales", scales.len()),
            ("int4 zero points", zeros.map_or(n * kg, <[u8]>::len)),
        ] {
            if len != n * kg {
                return Err(Int8Error::Length {
                    what,
                    expected: n * kg,
                    actual: len,
                }
                .into());
            }
        }
        let k_padded = int4_padded_k(k, group);
        let groups = k_padded / group;
        let (data_len, meta_len) = Self::part_lens(n, k_padded, group);
        let mut data = vec![0u8; data_len];
        let mut sc = vec![0u16; meta_len];
        let mut zs = zeros.map(|_| vec![0u8; meta_len]);
        let tile_bytes = k_padded / STEP_K * STEP_BYTES;
        for j in 0..n {
            let (t, r) = (j / TILE_ROWS, j % TILE_ROWS);
            for (i, &v) in u[j * k..(j + 1) * k].iter().enumerate() {
                if v > 15 {
                    return Err(Int4Error::Nibble {
                        what: "value",
                        row: j,
                    });
                }
                let (byte, shift) = nibble_at(tile_bytes, t, r, i);
                data[byte] |= v << shift;
            }
            for g in 0..kg {
                let at = (t * groups + g) * TILE_ROWS + r;
                let s = half::f16::from_f32(scales[j * kg + g]);
                if !s.is_finite() {
                    return Err(Int4Error::Scale { row: j, group: g });
                }
                sc[at] = s.to_bits();
                if let (Some(zs), Some(z)) = (&mut zs, zeros) {
                    let z = z[j * kg + g];
                    if z > 15 {
                        return Err(Int4Error::Nibble {
                            what: "zero point",
                            row: j,
                        });
                    }
                    zs[at] = z;
                }
            }
        }
        Ok(Self {
            n,
            k,
            k_padded,
            group,
            data: data.into(),
            scales: sc.into(),
            zeros: zs.map(Into::into),
        })
    }

    /// A matrix over stored parts (checked for length only; nothing is read, so mapped parts
    /// stay unread). Call [`Self::validate`] before the first product.
    pub fn from_parts(
        n: usize,
        k: usize,
        group: usize,
        data: Buf<u8>,
        scales: Buf<u16>,
        zeros: Option<Buf<u8>>,
    ) -> Result<Self, Int4Error> {
        if !GROUP_SIZES.contains(&group) {
            return Err(Int4Error::Group(group));
        }
        if k > MAX_K {
            return Err(Int8Error::KTooLarge { k }.into());
        }
        let k_padded = int4_padded_k(k, group);
        let (data_len, meta_len) = Self::part_lens(n, k_padded, group);
        let lens = [
            ("int4 values", data.len(), data_len),
            ("int4 scales", scales.len(), meta_len),
            (
                "int4 zero points",
                zeros.as_ref().map_or(meta_len, |z| z.len()),
                meta_len,
            ),
        ];
        for (what, actual, expected) in lens {
            if actual != expected {
                return Err(Int8Error::Length {
                    what,
                    expected,
                    actual,
                }
                .into());
            }
        }
        Ok(Self {
            n,
            k,
            k_padded,
            group,
            data,
            scales,
            zeros,
        })
    }

    /// Checks what the kernels rely on and a corrupt file would break: finite scales, zero
    /// points in `[0, 15]`, zero padding (padded rows and columns).
    pub fn validate(&self) -> Result<(), Int4Error> {
        let groups = self.groups();
        for (at, &bits) in self.scales.iter().enumerate() {
            if !half::f16::from_bits(bits).is_finite() {
                return Err(Int4Error::Scale {
                    row: at / (groups * TILE_ROWS) * TILE_ROWS + at % TILE_ROWS,
                    group: at / TILE_ROWS % groups,
                });
            }
        }
        if let Some(zeros) = &self.zeros {
            if let Some(at) = zeros.iter().position(|&z| z > 15) {
                return Err(Int4Error::Nibble {
                    what: "zero point",
                    row: at / (groups * TILE_ROWS) * TILE_ROWS + at % TILE_ROWS,
                });
            }
        }
        let rows = self.n_tiles() * TILE_ROWS;
        for j in 0..rows {
            let cols = if j < self.n { self.k } else { 0 };
            for i in cols..self.k_padded {
                if self.get(j, i) != 0 {
                    return Err(Int4Error::Padding { row: j, col: i });
                }
            }
        }
        Ok(())
    }

    /// The stored nibble of row `j` (`< n_tiles · 16`), column `i` (`< k_padded`).
    pub fn get(&self, j: usize, i: usize) -> u8 {
        let (byte, shift) = nibble_at(self.tile_bytes(), j / TILE_ROWS, j % TILE_ROWS, i);
        (self.data[byte] >> shift) & 0x0f
    }

    /// Row `j`, group `g`'s scale.
    pub fn scale(&self, j: usize, g: usize) -> f32 {
        let at = (j / TILE_ROWS * self.groups() + g) * TILE_ROWS + j % TILE_ROWS;
        half::f16::from_bits(self.scales[at]).to_f32()
    }

    /// Row `j`, group `g`'s zero point.
    pub fn zero(&self, j: usize, g: usize) -> u8 {
        let at = (j / TILE_ROWS * self.groups() + g) * TILE_ROWS + j % TILE_ROWS;
        self.zeros.as_ref().map_or(SYMMETRIC_ZERO, |z| z[at])
    }

    /// Row `j`'s `k` weights as f32.
    pub fn dequantize_row(&self, j: usize) -> Vec<f32> {
        (0..self.k)
            .map(|i| {
                let g = i / self.group;
                self.scale(j, g) * (f32::from(self.get(j, i)) - f32::from(self.zero(j, g)))
            })
            .collect()
    }

    /// Bytes of the values, scales and zero points.
    pub fn bytes(&self) -> usize {
        self.data.byte_len() + self.scales.byte_len() + self.zeros.as_ref().map_or(0, Buf::byte_len)
    }
}

/// Byte index and shift of row `r` of tile `t`, column `i`.
fn nibble_at(tile_bytes: usize, t: usize, r: usize, i: usize) -> (usize, u32) {
    let (s, c) = (i / STEP_K, i % STEP_K);
    let byte = t * tile_bytes + s * STEP_BYTES + 4 * r + c % 4;
    (byte, if c < 4 { 0 } else { 4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize, k: usize, group: usize, asym: bool) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
        let kg = k.div_ceil(group);
        let u = (0..n * k).map(|i| ((i * 7 + i / 5) % 16) as u8).collect();
        let s = (0..n * kg)
            .map(|i| round_scale(0.01 + i as f32 * 1e-3))
            .collect();
        let z = (0..n * kg)
            .map(|i| if asym { (i % 16) as u8 } else { 8 })
            .collect();
        (u, s, z)
    }

    #[test]
    fn packs_and_reads_back_every_value() {
        for (n, k, group, asym) in [
            (1, 1, 32, false),
            (17, 100, 32, true),
            (16, 576, 128, false),
            (33, 130, 64, true),
        ] {
            let (u, s, z) = sample(n, k, group, asym);
            let m =
                Int4Matrix::from_quantized(n, k, group, &u, &s, asym.then_some(&z[..])).unwrap();
            m.validate().unwrap();
            assert_eq!(m.k_padded % group, 0);
            assert_eq!(m.k_padded % K_ALIGN, 0);
            let kg = k.div_ceil(group);
            for j in 0..n {
                let row = m.dequantize_row(j);
                for i in 0..k {
                    assert_eq!(m.get(j, i), u[j * k + i], "{n}x{k} [{j}][{i}]");
                    let g = i / group;
                    let want = s[j * kg + g] * (f32::from(u[j * k + i]) - f32::from(z[j * kg + g]));
                    assert_eq!(row[i], want);
                }
            }
            let back = Int4Matrix::from_parts(
                n,
                k,
                group,
                m.data.clone(),
                m.scales.clone(),
                m.zeros.clone(),
            )
            .unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn refuses_bad_values_and_corrupt_padding() {
        let (u, s, _) = sample(3, 40, 32, false);
        assert_eq!(
            Int4Matrix::from_quantized(3, 40, 48, &u, &s, None),
            Err(Int4Error::Group(48))
        );
        let mut bad = u.clone();
        bad[45] = 16;
        assert!(matches!(
            Int4Matrix::from_quantized(3, 40, 32, &bad, &s, None),
            Err(Int4Error::Nibble { row: 1, .. })
        ));
        let mut big = s.clone();
        big[2] = 1e6;
        assert!(matches!(
            Int4Matrix::from_quantized(3, 40, 32, &u, &big, None),
            Err(Int4Error::Scale { row: 1, group: 0 })
        ));
        let m = Int4Matrix::from_quantized(3, 40, 32, &u, &s, None).unwrap();
        let mut data = m.data.to_vec();
        // Row 0, column 40 (step 5, low nibble of byte 0 of that step): padding.
        data[5 * STEP_BYTES] |= 1;
        let corrupt =
            Int4Matrix::from_parts(3, 40, 32, data.into(), m.scales.clone(), None).unwrap();
        assert_eq!(
            corrupt.validate(),
            Err(Int4Error::Padding { row: 0, col: 40 })
        );
        let short = Int4Matrix::from_parts(3, 40, 32, vec![0u8; 10].into(), m.scales, None);
        assert!(matches!(
            short,
            Err(Int4Error::Int8(Int8Error::Length { .. }))
        ));
    }
}
