//! The weights of a decoder-only transformer, in one shape for every supported architecture.
//! Architecture files (`arch/`) fill these from checkpoint tensors; the engine runs them.

use crate::backend::cpu::int8::Int8Matrix;
use crate::backend::cpu::packed::PackedF32;
use crate::error::{Error, Result};

/// A dense `y = x·Wᵀ + b` for a checkpoint's `[out_features, in_features]` weight (the Hugging
/// Face / PyTorch layout), held in the form the CPU kernels read.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The checkpoint prefix (`model.layers.0.self_attn.q_proj`): names stats, blocks, reports.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    pub weight: LinearWeight,
    pub bias: Option<Vec<f32>>,
    /// Multiplies the input per channel before the product: SmoothQuant's 1/s where no norm
    /// precedes to absorb it (the int8 kernel applies it while quantizing activations).
    pub input_scale: Option<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// f32 weights in column panels (see [`PackedF32`]).
    F32(PackedF32),
    /// f32 weights as the checkpoint stores them, `[out, in]`: embedding tables, which are
    /// read a row per token (and multiplied by only as a tied head).
    F32Rows(Vec<f32>),
    /// W8A8: int8 weights with per-output-channel scales; activations are quantized per token
    /// at run time.
    Int8(Int8Matrix),
    /// Int8 weights with per-output-channel scales, f32 activations (weight-only; the head).
    Int8WeightOnly(Int8Matrix),
}

impl Linear {
    /// A linear layer from row-major `[out, in]` weights, packed for the matmul kernel.
    pub fn new(
        name: &str,
        out_features: usize,
        in_features: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Self {
        let mut lin = Linear::new_rows(name, out_features, in_features, weight, bias);
        lin.pack();
        lin
    }

    /// A linear layer that keeps its row-major `[out, in]` weights as they are.
    pub fn new_rows(
        name: &str,
        out_features: usize,
        in_features: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    ) -> Self {
        debug_assert_eq!(weight.len(), out_features * in_features);
        Linear {
            name: name.to_string(),
            out_features,
            in_features,
            weight: LinearWeight::F32Rows(weight),
            bias,
            input_scale: None,
        }
    }

    /// The f32 weights as the checkpoint stores them (`[out, in]`, a copy), `None` once
    /// quantized.
    pub fn f32_rows(&self) -> Option<Vec<f32>> {
        match &self.weight {
            LinearWeight::F32(w) => Some(w.to_rows()),
            LinearWeight::F32Rows(w) => Some(w.clone()),
            LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_) => None,
        }
    }

    /// Turns packed f32 weights back into the checkpoint's row-major layout.
    pub fn unpack(&mut self) {
        if let LinearWeight::F32(w) = &mut self.weight {
            let packed = std::mem::take(w);
            self.weight = LinearWeight::F32Rows(packed.into_rows());
        }
    }

    /// Puts row-major f32 weights into panels for the matmul kernel.
    pub fn pack(&mut self) {
        if let LinearWeight::F32Rows(w) = &mut self.weight {
            let rows = std::mem::take(w);
            self.weight = LinearWeight::F32(PackedF32::from_row_vec(
                rows,
                self.out_features,
                self.in_features,
            ));
        }
    }

    /// Applies `f` to every weight of input channel `i` (f32 weights only).
    pub fn map_input_channel(&mut self, i: usize, f: impl Fn(f32) -> f32) {
        let k = self.in_features;
        match &mut self.weight {
            LinearWeight::F32(w) => w.map_column(i, f),
            LinearWeight::F32Rows(w) => w.chunks_mut(k).for_each(|row| row[i] = f(row[i])),
            LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_) => {}
        }
    }

    pub fn num_params(&self) -> usize {
        self.out_features * self.in_features + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// Bytes the weights occupy in memory (what a decode step streams).
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::F32(w) => w.bytes(),
            LinearWeight::F32Rows(w) => w.len() * 4,
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
                m.data.len() + m.scales.len() * 4
            }
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4)
            + self.input_scale.as_ref().map_or(0, |s| s.len() * 4)
    }
}

#[derive(Debug, Clone)]
/// `name` is the checkpoint prefix (`model.norm`), so a quantized store keeps the names.
pub enum Norm {
    Rms {
        name: String,
        weight: Vec<f32>,
        eps: f32,
    },
    Layer {
        name: String,
        weight: Vec<f32>,
        bias: Vec<f32>,
        eps: f32,
    },
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
}

impl Attention {
    /// Bytes of the four projections' weights.
    pub fn weight_bytes(&self) -> usize {
        [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .map(|l| l.weight_bytes())
            .sum()
    }
}

/// `down(act(gate·x) ⊙ up·x)`: Mixtral's w1/w3/w2 and Qwen2-MoE's gate/up/down_proj.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl GatedMlp {
    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}

/// OPT's `fc2(act(fc1·x))`.
#[derive(Debug, Clone)]
pub struct PlainMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// Qwen2-MoE's always-on expert, scaled by `sigmoid(gate·x)`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: GatedMlp,
    pub gate: Linear,
}

#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub router: Linear,
    pub experts: Vec<GatedMlp>,
    pub shared: Option<SharedExpert>,
}

#[derive(Debug, Clone)]
pub enum Ffn {
    Moe(Box<MoeBlock>),
    Gated(GatedMlp),
    Plain(PlainMlp),
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Norm,
    pub attn: Attention,
    pub ffn_norm: Norm,
    pub ffn: Ffn,
}

#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embeddings `[vocab, word_embed_proj_dim]`; also the head when embeddings are tied.
    pub embed: Linear,
    /// Learned absolute positions (OPT), stored as in the checkpoint with its 2 leading rows:
    /// row `p + POSITION_OFFSET` embeds position `p`.
    pub positions: Option<Vec<f32>>,
    pub project_in: Option<Linear>,
    pub layers: Vec<Layer>,
    pub final_norm: Option<Norm>,
    pub project_out: Option<Linear>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
}

impl Weights {
    pub fn head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// Where architecture loaders get tensors from: a checkpoint directory or an .emoe store.
pub trait TensorSource {
    fn has(&self, name: &str) -> bool;
    /// The tensor as f32, checked against `shape`; `why` names the config fields behind the shape.
    fn tensor(&self, name: &str, shape: &[usize], why: &str) -> Result<Vec<f32>>;
    /// An int8 tensor (quantized stores only).
    fn tensor_i8(&self, name: &str, _shape: &[usize], _why: &str) -> Result<Vec<i8>> {
        Err(Error::UnsupportedDtype {
            name: name.to_string(),
            dtype: "I8 (only .emoe stores hold int8 tensors)".into(),
        })
    }
}

/// Helpers shared by the architecture loaders.
pub struct Loader<'a> {
    pub src: &'a dyn TensorSource,
}

impl Loader<'_> {
    /// A linear layer: `prefix.weight` (f32/f16/bf16), or in a quantized store `prefix.qweight`
    /// (int8) with `prefix.scales` and optionally `prefix.input_scale`.
    pub fn linear(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        why: &str,
    ) -> Result<Linear> {
        self.linear_as(prefix, out, inp, bias, why, false)
    }

    /// An embedding table: as [`Self::linear`], but f32 weights stay row-major (looked up a
    /// row per token).
    pub fn embedding(&self, prefix: &str, out: usize, inp: usize, why: &str) -> Result<Linear> {
        self.linear_as(prefix, out, inp, false, why, true)
    }

    fn linear_as(
        &self,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        why: &str,
        row_major: bool,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.src.tensor(&format!("{prefix}.bias"), &[out], why)?)
        } else {
            None
        };
        let qname = format!("{prefix}.qweight");
        if !self.src.has(&qname) {
            let weight = self
                .src
                .tensor(&format!("{prefix}.weight"), &[out, inp], why)?;
            let mut lin = Linear::new_rows(prefix, out, inp, weight, bias);
            if !row_major {
                lin.pack();
            }
            return Ok(lin);
        }
        let q = self.src.tensor_i8(&qname, &[out, inp], why)?;
        let scales = self.src.tensor(&format!("{prefix}.scales"), &[out], why)?;
        let matrix = Int8Matrix::from_quantized(out, inp, &q, scales)
            .map_err(|e| Error::invalid(format!("{qname}: {e}")))?;
        let scale_name = format!("{prefix}.input_scale");
        let input_scale = if self.src.has(&scale_name) {
            Some(self.src.tensor(&scale_name, &[inp], why)?)
        } else {
            None
        };
        // A marker tensor says the activations stay f32 (weight-only int8).
        let weight = if self.src.has(&format!("{prefix}.weight_only")) {
            LinearWeight::Int8WeightOnly(matrix)
        } else {
            LinearWeight::Int8(matrix)
        };
        Ok(Linear {
            name: prefix.to_string(),
            out_features: out,
            in_features: inp,
            weight,
            bias,
            input_scale,
        })
    }

    pub fn vector(&self, name: &str, len: usize, why: &str) -> Result<Vec<f32>> {
        self.src.tensor(name, &[len], why)
    }

    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<Norm> {
        Ok(Norm::Rms {
            name: prefix.to_string(),
            weight: self.vector(&format!("{prefix}.weight"), dim, "hidden_size")?,
            eps,
        })
    }

    pub fn layer_norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<Norm> {
        Ok(Norm::Layer {
            name: prefix.to_string(),
            weight: self.vector(&format!("{prefix}.weight"), dim, "hidden_size")?,
            bias: self.vector(&format!("{prefix}.bias"), dim, "hidden_size")?,
            eps,
        })
    }

    /// The first of `names` the source has (checkpoints differ in prefixes).
    pub fn first_present<'n>(&self, names: &[&'n str]) -> Result<&'n str> {
        names
            .iter()
            .copied()
            .find(|n| self.src.has(n))
            .ok_or_else(|| Error::MissingTensor {
                name: names.join("` or `"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packed and row-major weights are the same matrix to everything but the kernels.
    #[test]
    fn packing_keeps_the_matrix() {
        let (n, k) = (13, 6);
        let w: Vec<f32> = (0..n * k).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut packed = Linear::new("p", n, k, w.clone(), None);
        let mut rows = Linear::new_rows("r", n, k, w.clone(), None);
        assert!(matches!(packed.weight, LinearWeight::F32(_)));
        assert!(matches!(rows.weight, LinearWeight::F32Rows(_)));
        assert_eq!(packed.f32_rows(), Some(w.clone()));
        assert_eq!(rows.f32_rows(), Some(w.clone()));
        for lin in [&mut packed, &mut rows] {
            lin.map_input_channel(2, |v| v * 10.0);
            lin.map_input_channel(5, |v| -v);
        }
        let want: Vec<f32> = w
            .iter()
            .enumerate()
            .map(|(at, &v)| match at % k {
                2 => v * 10.0,
                5 => -v,
                _ => v,
            })
            .collect();
        assert_eq!(packed.f32_rows(), Some(want.clone()));
        assert_eq!(rows.f32_rows(), Some(want.clone()));
        packed.unpack();
        assert!(matches!(&packed.weight, LinearWeight::F32Rows(r) if *r == want));
        rows.pack();
        assert_eq!(rows.f32_rows(), Some(want));
        assert_eq!(rows.weight_bytes(), 2 * 8 * k * 4);
    }
}
