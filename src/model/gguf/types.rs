//! ggml tensor types: block sizes for every type a GGUF file may hold (so any valid file
//! parses), and dequantization for the ones edgemoe reads. Block layouts follow
//! ggml-common.h: a block of 32 values is an f16 scale `d` (and for Q4_1 an f16 minimum `m`)
//! followed by the quants; in the 4-bit types byte `j` holds value `j` in its low nibble and
//! value `j + 16` in its high nibble.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    id: u32,
    name: &'static str,
    /// Values per block and bytes per block.
    block: usize,
    block_bytes: usize,
}

/// (id, name, values per block, bytes per block), from ggml.h's `ggml_type` and ggml-common.h.
const TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q4_0: u32 = 2;
pub const Q4_1: u32 = 3;
pub const Q8_0: u32 = 8;
pub const BF16: u32 = 30;

/// What [`dequantize`] and the in-place readers handle.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1";

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block, block_bytes)| GgmlType {
                id,
                name,
                block,
                block_bytes,
            })
    }

    pub fn id(self) -> u32 {
        self.id
    }

    pub fn name(self) -> &'static str {
        self.name
    }

    /// Values per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        (self.block, self.block_bytes)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The f32 values of `bytes` holding whole blocks of a quantized type; `None` for a type not
/// handled here.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let (block, block_bytes) = ty.block();
    debug_assert_eq!(bytes.len() % block_bytes, 0);
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * block);
    let blocks = bytes.chunks_exact(block_bytes);
    match ty.id {
        Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| (i32::from(q & 0xF) - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| (i32::from(q >> 4) - 8) as f32 * d));
            }
        }
        Q4_1 => {
            for b in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0xF) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        for &(id, name, block, bytes) in TYPES {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!((t.name(), t.block()), (name, (block, bytes)));
        }
        assert!(GgmlType::from_id(4).is_none());
        assert!(GgmlType::from_id(1000).is_none());
    }

    #[test]
    fn q4_1_nibble_order() {
        // d = 1, m = -8: value = q - 8; byte j = (j+16) << 4 | j (mod 16).
        let mut b = half::f16::from_f32(1.0).to_le_bytes().to_vec();
        b.extend(half::f16::from_f32(-8.0).to_le_bytes());
        b.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let v = dequantize(GgmlType::from_id(Q4_1).unwrap(), &b).unwrap();
        let want: Vec<f32> = (0..16)
            .map(|j| j as f32 - 8.0)
            .chain((0..16).map(|j| (15 - j) as f32 - 8.0))
            .collect();
        assert_eq!(v, want);
    }
}
