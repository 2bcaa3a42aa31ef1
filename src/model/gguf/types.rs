//! ggml tensor types: block sizes for every type a GGUF file may hold (so any valid file
//! parses), and dequantization for the ones edgemoe reads. Block layouts follow
//! ggml-common.h: a block of 32 values is an f16 scale `d` (and for Q4_1 an f16 minimum `m`)
//! followed by the quants; in the 4-bit types byte `j` holds value `j` in its low nibble and
//! value `j + 16` in its high nibble. The k-quants (Q4_K, Q5_K, Q6_K) pack 256 values in 8 or
//! 16 sub-blocks with their own 6- or 8-bit scales ([`kquants`]); MXFP4 is a block of 32 FP4
//! (e2m1) values sharing a power-of-two (e8m0) scale.
//!
//! Every formula keeps the association (and so the f32 rounding) of the `gguf` Python
//! package's dequantizers, which tests/gguf_quants.rs checks bit for bit.

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
pub const Q5_0: u32 = 6;
pub const Q5_1: u32 = 7;
pub const Q8_0: u32 = 8;
pub const Q4_K: u32 = 12;
pub const Q5_K: u32 = 13;
pub const Q6_K: u32 = 14;
pub const BF16: u32 = 30;
pub const MXFP4: u32 = 39;

/// What [`dequantize`] and the in-place readers handle.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, MXFP4";

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

    /// Whether [`dequantize_into`] decodes this type (a quantized type edgemoe reads).
    pub fn is_dequantizable(self) -> bool {
        matches!(
            self.id,
            Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q4_K | Q5_K | Q6_K | MXFP4
        )
    }

    /// Bytes of `values` values (whole blocks), `None` when `values` is not whole blocks or
    /// the size overflows.
    pub fn bytes_for(self, values: usize) -> Option<usize> {
        if !values.is_multiple_of(self.block) {
            return None;
        }
        (values / self.block).checked_mul(self.block_bytes)
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The f32 values of `bytes` holding whole blocks of a quantized type; `None` for a type not
/// handled here or bytes that are not whole blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let (block, block_bytes) = ty.block();
    if !ty.is_dequantizable() || !bytes.len().is_multiple_of(block_bytes) {
        return None;
    }
    let mut out = vec![0f32; bytes.len() / block_bytes * block];
    dequantize_into(ty, bytes, &mut out).then_some(out)
}

/// Decodes `bytes` (whole blocks of `ty`) into `out`, which must hold exactly their values;
/// false (and `out` untouched) for a type not handled here or mismatched lengths.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> bool {
    let (block, block_bytes) = ty.block();
    if !ty.is_dequantizable()
        || !bytes.len().is_multiple_of(block_bytes)
        || bytes.len() / block_bytes * block != out.len()
    {
        return false;
    }
    let pairs = bytes
        .chunks_exact(block_bytes)
        .zip(out.chunks_exact_mut(block));
    match ty.id {
        Q8_0 => pairs.for_each(|(b, y)| q8_0(b, y)),
        Q4_0 => pairs.for_each(|(b, y)| q4_0(b, y)),
        Q4_1 => pairs.for_each(|(b, y)| q4_1(b, y)),
        Q5_0 => pairs.for_each(|(b, y)| q5_0(b, y)),
        Q5_1 => pairs.for_each(|(b, y)| q5_1(b, y)),
        Q4_K => pairs.for_each(|(b, y)| kquants::q4_k(b, y)),
        Q5_K => pairs.for_each(|(b, y)| kquants::q5_k(b, y)),
        Q6_K => pairs.for_each(|(b, y)| kquants::q6_k(b, y)),
        MXFP4 => pairs.for_each(|(b, y)| mxfp4(b, y)),
        _ => return false,
    }
    true
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (v, &q) in y.iter_mut().zip(&b[2..34]) {
        *v = f32::from(q as i8) * d;
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[2..18]) {
        *l = (i32::from(q & 0xF) - 8) as f32 * d;
        *h = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[4..20]) {
        *l = f32::from(q & 0xF) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

/// Q5_0/Q5_1's fifth bits: bit `i` of the little-endian u32 at `at` belongs to value `i`.
fn fifth_bits(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Value `i` of a 5-bit block: its nibble (low for i < 16, high above) and its fifth bit.
fn five_bits(qs: &[u8], qh: u32, i: usize) -> u8 {
    let nibble = if i < 16 { qs[i] & 0xF } else { qs[i - 16] >> 4 };
    nibble | ((((qh >> i) & 1) as u8) << 4)
}

/// Q5_0 (22 bytes): f16 d, 32 fifth bits, 16 bytes of nibbles; value `(q − 16)·d`. The type
/// llama-quantize falls back to for Q4_K rows that are not whole 256-value super-blocks.
fn q5_0(b: &[u8], y: &mut [f32]) {
    let (d, qh) = (f16_at(b, 0), fifth_bits(b, 2));
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * f32::from(five_bits(&b[6..22], qh, i) as i8 - 16);
    }
}

/// Q5_1 (24 bytes): f16 d and m, 32 fifth bits, 16 bytes of nibbles; value `d·q + m`.
fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m, qh) = (f16_at(b, 0), f16_at(b, 2), fifth_bits(b, 4));
    for (i, v) in y.iter_mut().enumerate() {
        *v = d * f32::from(five_bits(&b[8..24], qh, i)) + m;
    }
}

/// FP4 e2m1 values, doubled (the e8m0 scale is halved to match): codes 0–7 are
/// 0, 0.5, 1, 1.5, 2, 3, 4, 6 and 8–15 their negatives.
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of the e8m0 scale `2^(e - 127)`, as f32 bits: `2^(e - 128)`, subnormal below e = 2.
pub fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// One MXFP4 block: the e8m0 exponent, then 16 bytes holding values `j` (low nibble) and
/// `j + 16` (high nibble).
fn mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_half(b[0]);
    let (lo, hi) = y.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(&b[1..17]) {
        *l = d * f32::from(E2M1_DOUBLED[usize::from(q & 0xF)]);
        *h = d * f32::from(E2M1_DOUBLED[usize::from(q >> 4)]);
    }
}

/// The 256-value super-blocks.
mod kquants {
    use super::f16_at;

    /// Sub-block `g`'s 6-bit scale and minimum in Q4_K/Q5_K's 12 packed bytes: for g < 4 the
    /// low 6 bits of bytes g and g + 4; above, a nibble of byte g + 4 with the top 2 bits of
    /// byte g - 4 (scale) or g (minimum).
    fn scale_min(s: &[u8], g: usize) -> (u8, u8) {
        if g < 4 {
            (s[g] & 63, s[g + 4] & 63)
        } else {
            (
                (s[g + 4] & 0xF) | ((s[g - 4] >> 6) << 4),
                (s[g + 4] >> 4) | ((s[g] >> 6) << 4),
            )
        }
    }

    /// Q4_K (144 bytes): f16 d, f16 dmin, 12 scale bytes, 128 bytes of nibbles; sub-block g
    /// of 32 values is `(d·sc)·q − dmin·m` with q the low (even g) or high (odd g) nibbles of
    /// bytes 32·(g/2) ..+32.
    pub(super) fn q4_k(b: &[u8], y: &mut [f32]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qs) = (&b[4..16], &b[16..144]);
        for (g, out) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min(scales, g);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let shift = 4 * (g % 2);
            let q = &qs[32 * (g / 2)..32 * (g / 2) + 32];
            for (v, &byte) in out.iter_mut().zip(q) {
                *v = dl * f32::from((byte >> shift) & 0xF) - ml;
            }
        }
    }

    /// Q5_K (176 bytes): Q4_K's header, 32 bytes of fifth bits (bit g of byte j for value j of
    /// sub-block g), then Q4_K's nibbles.
    pub(super) fn q5_k(b: &[u8], y: &mut [f32]) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
        for (g, out) in y.chunks_exact_mut(32).enumerate() {
            let (sc, m) = scale_min(scales, g);
            let (dl, ml) = (d * f32::from(sc), dmin * f32::from(m));
            let shift = 4 * (g % 2);
            let q = &qs[32 * (g / 2)..32 * (g / 2) + 32];
            for ((v, &byte), &high) in out.iter_mut().zip(q).zip(qh) {
                let q = ((byte >> shift) & 0xF) | (((high >> g) & 1) << 4);
                *v = dl * f32::from(q) - ml;
            }
        }
    }

    /// Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one
    /// per 16 values), f16 d. In each half h of 128 values, group t of 32 takes the low (t < 2)
    /// or high nibble of ql[64h + 32·(t % 2) + j] and bits 2t of qh[32h + j]; value
    /// `(d·scale)·(q − 32)`.
    pub(super) fn q6_k(b: &[u8], y: &mut [f32]) {
        let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (i, v) in y.iter_mut().enumerate() {
            let (h, t, j) = (i / 128, (i % 128) / 32, i % 32);
            let low = (ql[64 * h + 32 * (t % 2) + j] >> (4 * (t / 2))) & 0xF;
            let high = (qh[32 * h + j] >> (2 * t)) & 3;
            let q = i32::from(low | (high << 4)) - 32;
            let dl = d * f32::from(scales[i / 16] as i8);
            *v = dl * q as f32;
        }
    }
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
