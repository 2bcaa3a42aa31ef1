//! GPT-OSS's released experts in MXFP4, as its checkpoints store them:
//! `mlp.experts.gate_up_proj_blocks` `[experts, 2·intermediate, hidden / 32, 16]` (U8, two FP4
//! values a byte, the even one in the low nibble) with `gate_up_proj_scales` `[experts,
//! 2·intermediate, hidden / 32]` (U8 e8m0 exponents), `down_proj_blocks` / `_scales` likewise
//! over `[experts, hidden, intermediate / 32]`; rows are output features (gate and up
//! interleaved, as in the dense layout's columns), biases as in the dense checkpoint.
//!
//! Each 32-value block is repacked into GGUF's MXFP4 block (the exponent, then value `j` in the
//! low and `j + 16` in the high nibble of byte `j`), so the GGUF decoder and the loader's
//! handling of a file's quantized blocks ([`crate::model::weights::WeightForm`]) apply: a
//! direct run converts each expert matrix to weight-only int8 rows, an f32 load
//! (`Model::load_f32`) decodes it exactly, `quantize` decodes one layer at a time.

use super::gpt_oss::PROJECTIONS;
use crate::error::{Error, Result};
use crate::model::buf::map_copy_of;
use crate::model::config::ModelConfig;
use crate::model::gguf::blocks::BlockMatrix;
use crate::model::gguf::types::{GgmlType, MXFP4};
use crate::model::weights::{GatedMlp, Linear, Loader, Stored};
use std::sync::Arc;

/// Values a block, and bytes of a GGUF MXFP4 block (exponent + 16).
const BLOCK: usize = 32;
const GGUF_BLOCK_BYTES: usize = 17;

/// Every expert of layer `layer` (block prefix `p`), from MXFP4 blocks.
pub fn experts(l: &Loader, cfg: &ModelConfig, layer: usize, p: &str) -> Result<Vec<GatedMlp>> {
    let (h, f, n) = (cfg.hidden_size, cfg.expert_ffn, cfg.num_experts);
    let e = "num_local_experts";
    let gate_up = Packed::read(l, &format!("{p}.experts.gate_up_proj"), (n, 2 * f, h), e)?;
    let down = Packed::read(l, &format!("{p}.experts.down_proj"), (n, h, f), e)?;
    let gate_up_bias = l.src.tensor(
        &format!("{p}.experts.gate_up_proj_bias"),
        &[n, 2 * f],
        &format!("{e} × 2·intermediate_size"),
    )?;
    let down_bias = l.src.tensor(
        &format!("{p}.experts.down_proj_bias"),
        &[n, h],
        &format!("{e} × hidden_size"),
    )?;
    (0..n)
        .map(|x| {
            let name = |proj: &str| format!("{p}.experts.{x}.{proj}");
            let rows = |first: usize, step: usize, count: usize| -> Vec<usize> {
                (0..count).map(|j| x * step + first + 2 * j).collect()
            };
            let gu_bias = &gate_up_bias[x * 2 * f..(x + 1) * 2 * f];
            let half_bias = |odd: usize| (0..f).map(|j| gu_bias[2 * j + odd]).collect();
            let down_rows: Vec<usize> = (x * h..(x + 1) * h).collect();
            let mut mlp = GatedMlp::new(
                gate_up.linear(l, &name(PROJECTIONS[0]), &rows(0, 2 * f, f), half_bias(0))?,
                gate_up.linear(l, &name(PROJECTIONS[1]), &rows(1, 2 * f, f), half_bias(1))?,
                down.linear(
                    l,
                    &name(PROJECTIONS[2]),
                    &down_rows,
                    down_bias[x * h..(x + 1) * h].to_vec(),
                )?,
            );
            mlp.block = l.src.expert_block(layer, x);
            Ok(mlp)
        })
        .collect()
}

/// One stacked MXFP4 tensor: its blocks and exponents, `rows` output rows of `cols` values
/// over all experts.
struct Packed {
    name: String,
    blocks: Vec<u8>,
    scales: Vec<u8>,
    cols: usize,
}

impl Packed {
    fn read(
        l: &Loader,
        prefix: &str,
        (experts, rows, cols): (usize, usize, usize),
        why: &str,
    ) -> Result<Packed> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(Error::invalid(format!(
                "{prefix}_blocks: {cols} values a row is not whole blocks of {BLOCK}"
            )));
        }
        let groups = cols / BLOCK;
        let why = format!("{why} × rows × {cols} / {BLOCK}");
        let bytes = |name: String, shape: &[usize]| -> Result<Vec<u8>> {
            match l.src.stored(&name, shape, &why)? {
                Stored::U8(b) => Ok(b.to_vec()),
                _ => Err(Error::invalid(format!("{name}: expected U8 (MXFP4)"))),
            }
        };
        Ok(Packed {
            blocks: bytes(
                format!("{prefix}_blocks"),
                &[experts, rows, groups, BLOCK / 2],
            )?,
            scales: bytes(format!("{prefix}_scales"), &[experts, rows, groups])?,
            name: format!("{prefix}_blocks"),
            cols,
        })
    }

    /// The linear of stacked rows `rows` (in order), named `name`, with `bias`: its rows
    /// repacked into GGUF MXFP4 blocks and made what the loader's form says.
    fn linear(&self, l: &Loader, name: &str, rows: &[usize], bias: Vec<f32>) -> Result<Linear> {
        let groups = self.cols / BLOCK;
        let mut packed = Vec::with_capacity(rows.len() * groups * GGUF_BLOCK_BYTES);
        for &r in rows {
            for g in 0..groups {
                let at = r * groups + g;
                let hf = &self.blocks[at * BLOCK / 2..(at + 1) * BLOCK / 2];
                // Value k: low nibble of byte k/2 for even k, high for odd.
                let value = |k: usize| (hf[k / 2] >> (4 * (k % 2))) & 0xF;
                packed.push(self.scales[at]);
                packed.extend((0..BLOCK / 2).map(|j| value(j) | (value(j + BLOCK / 2) << 4)));
            }
        }
        let map = map_copy_of(&packed).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
        let ty = GgmlType::from_id(MXFP4).ok_or_else(|| Error::invalid("MXFP4 type"))?;
        let matrix =
            BlockMatrix::new(map, 0, (rows.len(), self.cols), ty, None).ok_or_else(|| {
                Error::invalid(format!("{}: {} rows do not fit", self.name, rows.len()))
            })?;
        Ok(Linear {
            name: name.to_string(),
            out_features: rows.len(),
            in_features: self.cols,
            weight: l.block_weight(Arc::new(matrix), name, false)?,
            bias: Some(bias),
            input_scale: None,
        })
    }
}
