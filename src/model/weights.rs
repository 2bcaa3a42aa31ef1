//! The weights of a decoder-only transformer, in one shape for every supported architecture.
//! Architecture files (`arch/`) fill these from checkpoint tensors; the engine runs them.

use crate::error::{Error, Result};
use crate::model::buf::{Buf, HalfKind, SharedMap};
use crate::model::gguf::blocks::BlockMatrix;
use crate::model::int4::Int4Matrix;
use crate::model::int8::{padded_k, Int8Matrix};
use std::any::Any;
use std::sync::{Arc, OnceLock};

/// A dense `y = x·Wᵀ + b` for a checkpoint's `[out_features, in_features]` weight (the Hugging
/// Face / PyTorch layout), described as stored; a backend may hold a matrix in a layout of its
/// own ([`LinearWeight::Prepared`]).
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
    /// f32 weights a backend rearranged for its kernels when it took the model (the CPU's
    /// column panels): see [`PreparedMatrix`].
    Prepared(Arc<dyn PreparedMatrix>),
    /// f32 weights as the checkpoint stores them, `[out, in]` (in place where the checkpoint
    /// is mapped): embedding tables, which are read a row per token (and multiplied by only as
    /// a tied head).
    F32Rows(Buf<f32>),
    /// bf16 or f16 weights as the checkpoint stores them, `[out, in]`, in place: kernels widen
    /// them to f32 in registers, so they stream half the bytes of f32.
    Half(HalfKind, Buf<u16>),
    /// W8A8: int8 weights with per-output-channel scales; activations are quantized per token
    /// at run time.
    Int8(Int8Matrix),
    /// Int8 weights with per-output-channel scales, f32 activations (weight-only; the head).
    Int8WeightOnly(Int8Matrix),
    /// W4A8: int4 weights with per-group scales (the experts of `quantize --bits 4`);
    /// activations are quantized per token at run time, as for W8A8.
    Int4(Int4Matrix),
}

/// An f32 matrix in a layout one backend chose for its own kernels, or a file's quantized
/// blocks awaiting the quantizer ([`BlockMatrix`]). `model/` sees only what reports and the
/// quantizer need; the backend that made it reads it through [`Self::as_any`] (others through
/// [`Self::to_rows`]).
pub trait PreparedMatrix: std::fmt::Debug + Send + Sync + Any {
    /// The matrix as the checkpoint stores it, row-major `[out, in]` (a copy).
    fn to_rows(&self) -> Vec<f32>;
    /// Bytes the prepared matrix occupies (what a decode step streams).
    fn bytes(&self) -> usize;
    /// Bytes read to look up one row (an embedding row).
    fn row_read_bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
}

impl Linear {
    /// A linear layer over row-major `[out, in]` f32 weights (the backend that runs it may
    /// prepare them for its kernels).
    pub fn new(
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
            weight: LinearWeight::F32Rows(weight.into()),
            bias,
            input_scale: None,
        }
    }

    /// The f32 weights as the checkpoint stores them (`[out, in]`, a copy), `None` once
    /// quantized.
    pub fn f32_rows(&self) -> Option<Vec<f32>> {
        match &self.weight {
            LinearWeight::Prepared(w) => Some(w.to_rows()),
            LinearWeight::F32Rows(w) => Some(w.to_vec()),
            LinearWeight::Half(kind, w) => Some(kind.widen(w)),
            LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_) | LinearWeight::Int4(_) => None,
        }
    }

    /// The weights as f32 rows `[out, in]` whatever the stored form: quantized ones
    /// dequantized (their rounding kept).
    pub fn dense_rows(&self) -> Vec<f32> {
        if let Some(rows) = self.f32_rows() {
            return rows;
        }
        let k = self.in_features;
        match &self.weight {
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => (0..m.n)
                .flat_map(|j| {
                    let s = m.scales[j];
                    m.row(j)[..k].iter().map(move |&q| q as f32 * s)
                })
                .collect(),
            LinearWeight::Int4(m) => (0..self.out_features)
                .flat_map(|j| m.dequantize_row(j).into_iter().take(k))
                .collect(),
            _ => unreachable!("f32_rows covers the f32 and half forms"),
        }
    }

    /// Turns a backend's prepared f32 matrix back into the checkpoint's row-major layout.
    pub fn unpack(&mut self) {
        if let LinearWeight::Prepared(w) = &self.weight {
            self.weight = LinearWeight::F32Rows(w.to_rows().into());
        }
    }

    /// Whether a backend holds the weights in a layout of its own.
    pub fn is_prepared(&self) -> bool {
        matches!(self.weight, LinearWeight::Prepared(_))
    }

    /// Widens bf16/f16 weights, and decodes a file's quantized blocks (GGUF), to row-major
    /// f32 the process owns, releasing their file pages.
    pub fn widen_half_rows(&mut self) {
        match &self.weight {
            LinearWeight::Half(kind, w) => {
                let rows = kind.widen(w);
                if let Some((map, at, len)) = w.mapping() {
                    crate::model::buf::release_pages(map, at, len);
                }
                self.weight = LinearWeight::F32Rows(rows.into());
            }
            LinearWeight::Prepared(p) => {
                if let Some(b) = p.as_any().downcast_ref::<BlockMatrix>() {
                    let rows = b.to_rows();
                    b.release();
                    self.weight = LinearWeight::F32Rows(rows.into());
                }
            }
            _ => {}
        }
    }

    /// Applies `f` to every weight of input channel `i` (half-precision and prepared weights
    /// become row-major f32 first; int8 ones are left alone).
    pub fn map_input_channel(&mut self, i: usize, f: impl Fn(f32) -> f32) {
        let k = self.in_features;
        self.widen_half_rows();
        self.unpack();
        if let LinearWeight::F32Rows(w) = &mut self.weight {
            w.make_mut()
                .chunks_mut(k)
                .for_each(|row| row[i] = f(row[i]));
        }
    }

    /// Multiplies output channel `j` (weight row and bias) by `s[j]` (floating-point weights
    /// become row-major f32; int8 ones are left alone).
    pub fn scale_output_channels(&mut self, s: &[f32]) {
        let Some(mut rows) = self.f32_rows() else {
            return;
        };
        let k = self.in_features;
        for (row, &f) in rows.chunks_mut(k.max(1)).zip(s) {
            row.iter_mut().for_each(|v| *v *= f);
        }
        if let Some(b) = &mut self.bias {
            b.iter_mut().zip(s).for_each(|(v, f)| *v *= f);
        }
        self.weight = LinearWeight::F32Rows(rows.into());
    }

    pub fn num_params(&self) -> usize {
        self.out_features * self.in_features + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// Calls `f` with every buffer the layer's values live in.
    pub fn visit_storage<'a>(&'a self, f: &mut dyn FnMut(Storage<'a>)) {
        match &self.weight {
            LinearWeight::Prepared(w) => f(Storage::Owned(w.bytes())),
            LinearWeight::F32Rows(w) => f(Storage::of(w)),
            LinearWeight::Half(_, w) => f(Storage::of(w)),
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
                f(Storage::of(&m.data));
                f(Storage::of(&m.scales));
                f(Storage::of(&m.row_sums));
            }
            LinearWeight::Int4(m) => {
                f(Storage::of(&m.data));
                f(Storage::of(&m.scales));
                if let Some(z) = &m.zeros {
                    f(Storage::of(z));
                }
            }
        }
        let small =
            self.bias.as_ref().map_or(0, Vec::len) + self.input_scale.as_ref().map_or(0, Vec::len);
        f(Storage::Owned(small * 4));
    }

    /// Checks a quantized matrix's values as the kernels rely on them (see
    /// [`Int8Matrix::validate`], [`Int4Matrix::validate`]); other forms have nothing to check.
    pub fn validate_quantized(&self) -> std::result::Result<(), String> {
        match &self.weight {
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => {
                m.validate().map_err(|e| e.to_string())
            }
            LinearWeight::Int4(m) => m.validate().map_err(|e| e.to_string()),
            _ => Ok(()),
        }
    }

    /// Bytes read to look up one row of the matrix (an embedding row).
    pub fn row_read_bytes(&self) -> usize {
        let k = self.in_features;
        match &self.weight {
            LinearWeight::F32Rows(_) => 4 * k,
            LinearWeight::Prepared(w) => w.row_read_bytes(),
            LinearWeight::Half(..) => 2 * k,
            LinearWeight::Int8(_) | LinearWeight::Int8WeightOnly(_) => k + 4,
            LinearWeight::Int4(m) => m.bytes() / m.n.max(1),
        }
    }

    /// Bytes the weights occupy in memory (what a decode step streams).
    pub fn weight_bytes(&self) -> usize {
        let w = match &self.weight {
            LinearWeight::Prepared(w) => w.bytes(),
            LinearWeight::F32Rows(w) => w.byte_len(),
            LinearWeight::Half(_, w) => w.byte_len(),
            LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => m.bytes(),
            LinearWeight::Int4(m) => m.bytes(),
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4)
            + self.input_scale.as_ref().map_or(0, |s| s.len() * 4)
    }
}

/// Where some weight values live, for memory reports.
pub enum Storage<'a> {
    /// Bytes of memory the process owns.
    Owned(usize),
    /// A byte range of a memory map.
    Mapped(&'a SharedMap, usize, usize),
}

impl Storage<'_> {
    fn of<T: crate::model::buf::Plain>(b: &Buf<T>) -> Storage<'_> {
        match b.mapping() {
            Some((map, offset, len)) => Storage::Mapped(map, offset, len),
            None => Storage::Owned(b.byte_len()),
        }
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
    /// `q_proj`; under latent attention `q_b_proj` where a `q_a_proj` comes first.
    pub q: Linear,
    /// `k_proj`; under latent attention `kv_a_proj_with_mqa` (the latent and the shared
    /// rotated key part).
    pub k: Linear,
    /// `v_proj`; under latent attention `kv_b_proj` (the latent to every head's unrotated key
    /// part and value).
    pub v: Linear,
    pub o: Linear,
    /// RMSNorms of the query and key projections' outputs, before RoPE (Qwen3-MoE per head,
    /// OLMoE over the whole projection: `ModelConfig::qk_norm` says which).
    pub qk_norm: Option<[Norm; 2]>,
    /// One sink logit per query head, joining that head's softmax denominator (GPT-OSS's
    /// `self_attn.sinks`).
    pub sinks: Option<Vec<f32>>,
    /// Multi-head latent attention's other parts (DeepSeek; `ModelConfig::options.mla`).
    pub latent: Option<Box<LatentParts>>,
}

/// What multi-head latent attention has beside q/k/v/o (see [`Attention`]'s fields).
#[derive(Debug, Clone)]
pub struct LatentParts {
    /// `q_a_proj` and `q_a_layernorm`, before `q_b_proj` (a low-rank query); `None`: `q_proj`.
    pub q_a: Option<(Linear, Norm)>,
    /// `kv_a_layernorm`, on the latent before `kv_b_proj`.
    pub kv_a_norm: Norm,
    /// `kv_b_proj` split per head for the absorbed attention, made from [`Attention::v`] when
    /// an engine first runs the layer (after every change a load makes to the weights).
    pub absorbed: OnceLock<AbsorbedHeads>,
}

/// `kv_b_proj` (`heads × (nope + v)` rows of `rank`) as the absorbed attention multiplies by
/// it: each head's key half `W_UK` (`nope × rank`) turns that head's unrotated query into a
/// query against the latent, and its value half `W_UV` (`v × rank`) turns the attention's mix
/// of latents into the head's output. Per head, so no `heads × rank`-wide product is formed.
#[derive(Debug, Clone)]
pub struct AbsorbedHeads {
    /// Per head `W_UKᵀ` as a linear of `nope` inputs and `rank` outputs.
    pub uk_t: Vec<Linear>,
    /// Per head `W_UV` as a linear of `rank` inputs and `v` outputs.
    pub uv: Vec<Linear>,
}

impl AbsorbedHeads {
    /// Splits `kv_b` into its heads' halves: bf16/f16 weights stay half precision (the split
    /// moves bits and rounds nothing), every other form is split as f32 (quantized ones
    /// dequantized).
    pub fn split(kv_b: &Linear, heads: usize, nope: usize, v: usize) -> AbsorbedHeads {
        let shape = (heads, nope, v, kv_b.in_features);
        match &kv_b.weight {
            LinearWeight::Half(kind, w) => {
                let kind = *kind;
                split_heads(&w[..], shape, &kv_b.name, |m| {
                    LinearWeight::Half(kind, m.into())
                })
            }
            _ => split_heads(&kv_b.dense_rows(), shape, &kv_b.name, |m| {
                LinearWeight::F32Rows(m.into())
            }),
        }
    }
}

/// [`AbsorbedHeads::split`] of row-major `[heads·(nope + v), rank]` values, each matrix
/// wrapped by `wrap`.
fn split_heads<T: Copy + Default>(
    rows: &[T],
    (heads, nope, v, rank): (usize, usize, usize, usize),
    name: &str,
    wrap: impl Fn(Vec<T>) -> LinearWeight,
) -> AbsorbedHeads {
    debug_assert_eq!(rows.len(), heads * (nope + v) * rank);
    let linear = |name: String, out_features, in_features, m: Vec<T>| Linear {
        name,
        out_features,
        in_features,
        weight: wrap(m),
        bias: None,
        input_scale: None,
    };
    let (mut uk_t, mut uv) = (Vec::with_capacity(heads), Vec::with_capacity(heads));
    for (h, head) in rows.chunks_exact((nope + v) * rank).enumerate() {
        let (uk, vals) = head.split_at(nope * rank);
        let mut t = vec![T::default(); rank * nope];
        for (i, row) in uk.chunks_exact(rank).enumerate() {
            for (c, &w) in row.iter().enumerate() {
                t[c * nope + i] = w;
            }
        }
        uk_t.push(linear(format!("{name}.uk_t.{h}"), rank, nope, t));
        uv.push(linear(format!("{name}.uv.{h}"), v, rank, vals.to_vec()));
    }
    AbsorbedHeads { uk_t, uv }
}

impl Attention {
    /// Drops latent attention's per-head split of `kv_b_proj` ([`LatentParts::absorbed`]),
    /// so the next step splits the matrix as it is now: whoever edits the weights after an
    /// engine ran them (quantize's calibration, then its folds and rounding) calls this.
    pub fn forget_absorbed(&mut self) {
        if let Some(l) = &mut self.latent {
            l.absorbed = OnceLock::new();
        }
    }

    /// Every projection: q/k/v/o, and a latent attention's `q_a_proj`.
    pub fn projections(&self) -> Vec<&Linear> {
        let mut v = vec![&self.q, &self.k, &self.v, &self.o];
        v.extend(
            self.latent
                .iter()
                .filter_map(|l| l.q_a.as_ref().map(|(q, _)| q)),
        );
        v
    }

    /// [`Self::projections`], mutable.
    pub fn projections_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![&mut self.q, &mut self.k, &mut self.v, &mut self.o];
        v.extend(
            self.latent
                .iter_mut()
                .filter_map(|l| l.q_a.as_mut().map(|(q, _)| q)),
        );
        v
    }

    /// The norms inside the attention: q/k norms and a latent attention's.
    pub fn norms(&self) -> Vec<&Norm> {
        let mut v: Vec<&Norm> = self.qk_norm.iter().flatten().collect();
        if let Some(l) = &self.latent {
            v.extend(l.q_a.as_ref().map(|(_, n)| n));
            v.push(&l.kv_a_norm);
        }
        v
    }

    /// Bytes of the projections' weights; under latent attention also the per-head split of
    /// `kv_b_proj` the engine makes ([`AbsorbedHeads`]: as many values, half precision kept,
    /// else f32), counted before it exists so that `--mem` plans for it.
    pub fn weight_bytes(&self) -> usize {
        self.projections()
            .iter()
            .map(|l| l.weight_bytes())
            .sum::<usize>()
            + self.split_bytes()
    }

    /// Bytes a step reads: [`Self::weight_bytes`] but latent attention's `kv_b_proj`, which
    /// only its split is multiplied by.
    pub fn streamed_bytes(&self) -> usize {
        match &self.latent {
            None => self.weight_bytes(),
            Some(_) => self.weight_bytes() - self.v.weight_bytes(),
        }
    }

    /// Bytes of the per-head split of latent attention's `kv_b_proj` (0 without one).
    fn split_bytes(&self) -> usize {
        let values = self.v.out_features * self.v.in_features;
        match (&self.latent, &self.v.weight) {
            (None, _) => 0,
            (Some(_), LinearWeight::Half(..)) => values * 2,
            (Some(_), _) => values * 4,
        }
    }
}

/// `down(act(gate·x) ⊙ up·x)`: Mixtral's w1/w3/w2 and Qwen2-MoE's gate/up/down_proj.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    /// The checksummed block the weights live in (an .emoe expert), verified on first use.
    pub block: Option<Arc<StoredBlock>>,
}

impl GatedMlp {
    pub fn new(gate: Linear, up: Linear, down: Linear) -> GatedMlp {
        GatedMlp {
            gate,
            up,
            down,
            block: None,
        }
    }

    pub fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }

    /// Verifies the block's checksum and the int8 matrices' values the first time the expert
    /// runs (mapped experts are not read at load); later calls return the cached verdict.
    pub fn ensure_verified(&self) -> Result<()> {
        let Some(block) = &self.block else {
            return Ok(());
        };
        let verdict = block.verdict.get_or_init(|| {
            block.checksum_verdict()?;
            for lin in [&self.gate, &self.up, &self.down] {
                lin.validate_quantized()
                    .map_err(|e| format!("{}: {}: {e}", block.what, lin.name))?;
            }
            Ok(())
        });
        verdict.clone().map_err(|reason| Error::Emoe {
            path: block.path.clone(),
            reason,
        })
    }
}

/// A checksummed byte range of a mapped file holding one expert's weights.
#[derive(Debug)]
pub struct StoredBlock {
    pub path: std::path::PathBuf,
    pub map: SharedMap,
    pub offset: usize,
    pub len: usize,
    pub crc32c: u32,
    /// Names the block in errors: `expert block (layer 3, expert 5) at offset 1234`.
    pub what: String,
    verdict: OnceLock<std::result::Result<(), String>>,
}

impl StoredBlock {
    /// Whether the block's bytes match its stored checksum (computed anew on every call).
    pub fn verify_checksum(&self) -> Result<()> {
        self.checksum_verdict().map_err(|reason| Error::Emoe {
            path: self.path.clone(),
            reason,
        })
    }

    fn checksum_verdict(&self) -> std::result::Result<(), String> {
        let bytes = self.map.get(self.offset..self.offset + self.len);
        let computed = bytes.map(crc32c::crc32c);
        if computed != Some(self.crc32c) {
            return Err(format!(
                "{}: checksum mismatch (stored crc32c {:#010x}, computed {:#010x}): the file is corrupt",
                self.what,
                self.crc32c,
                computed.unwrap_or(0)
            ));
        }
        Ok(())
    }

    pub fn new(
        path: &std::path::Path,
        map: SharedMap,
        range: (usize, usize),
        crc32c: u32,
        what: String,
    ) -> StoredBlock {
        StoredBlock {
            path: path.to_path_buf(),
            map,
            offset: range.0,
            len: range.1,
            crc32c,
            what,
            verdict: OnceLock::new(),
        }
    }
}

/// OPT's `fc2(act(fc1·x))`.
#[derive(Debug, Clone)]
pub struct PlainMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

/// An always-on expert: Qwen2-MoE's, scaled by `sigmoid(gate·x)`; GraniteMoeShared's and
/// GLM-4-MoE's, added as it is (`gate` is `None`).
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: GatedMlp,
    pub gate: Option<Linear>,
}

#[derive(Debug, Clone)]
pub struct MoeBlock {
    pub router: Linear,
    pub experts: Vec<GatedMlp>,
    pub shared: Option<SharedExpert>,
    /// Added to the sigmoid scores to choose experts, not to weight them (GLM-4-MoE's
    /// `e_score_correction_bias`, stored beside the router as `P.e_score_correction_bias`).
    pub score_bias: Option<Vec<f32>>,
}

// One per layer: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
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
    /// `hidden × hidden`, applied to the final norm's output before the head (a rotated model
    /// whose head stays tied to its rotated embeddings: `config.head_transform`).
    pub head_transform: Option<Linear>,
    pub project_out: Option<Linear>,
    /// `None` when tied to `embed`.
    pub lm_head: Option<Linear>,
}

impl Weights {
    pub fn head(&self) -> &Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every linear layer, experts included.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.embed];
        v.extend(
            [
                &self.project_in,
                &self.head_transform,
                &self.project_out,
                &self.lm_head,
            ]
            .into_iter()
            .flatten(),
        );
        for l in &self.layers {
            v.extend(l.attn.projections());
            fn mlp(m: &GatedMlp) -> [&Linear; 3] {
                [&m.gate, &m.up, &m.down]
            }
            match &l.ffn {
                Ffn::Moe(b) => {
                    v.push(&b.router);
                    b.experts.iter().for_each(|e| v.extend(mlp(e)));
                    if let Some(s) = &b.shared {
                        v.extend(mlp(&s.mlp));
                        v.extend(&s.gate);
                    }
                }
                Ffn::Gated(m) => v.extend(mlp(m)),
                Ffn::Plain(m) => v.extend([&m.fc1, &m.fc2]),
            }
        }
        v
    }

    /// Every linear layer but the embedding table (the matrices a backend may prepare),
    /// experts included.
    pub fn projections_mut(&mut self) -> Vec<&mut Linear> {
        let mut v: Vec<&mut Linear> = [
            &mut self.project_in,
            &mut self.head_transform,
            &mut self.project_out,
            &mut self.lm_head,
        ]
        .into_iter()
        .flatten()
        .collect();
        for l in &mut self.layers {
            v.extend(l.attn.projections_mut());
            fn mlp(m: &mut GatedMlp) -> [&mut Linear; 3] {
                [&mut m.gate, &mut m.up, &mut m.down]
            }
            match &mut l.ffn {
                Ffn::Moe(b) => {
                    v.push(&mut b.router);
                    b.experts.iter_mut().for_each(|e| v.extend(mlp(e)));
                    if let Some(s) = &mut b.shared {
                        v.extend(mlp(&mut s.mlp));
                        v.extend(&mut s.gate);
                    }
                }
                Ffn::Gated(m) => v.extend(mlp(m)),
                Ffn::Plain(m) => v.extend([&mut m.fc1, &mut m.fc2]),
            }
        }
        v
    }

    /// Calls `f` with every buffer the weights live in (norms and positions included).
    pub fn visit_storage<'a>(&'a self, f: &mut dyn FnMut(Storage<'a>)) {
        for lin in self.linears() {
            lin.visit_storage(f);
        }
        let norm_len = |n: &Norm| match n {
            Norm::Rms { weight, .. } => weight.len(),
            Norm::Layer { weight, bias, .. } => weight.len() + bias.len(),
        };
        let mut small = self.positions.as_ref().map_or(0, Vec::len);
        small += self.final_norm.as_ref().map_or(0, norm_len);
        for l in &self.layers {
            small += norm_len(&l.attn_norm) + norm_len(&l.ffn_norm);
            if let Ffn::Moe(b) = &l.ffn {
                small += b.score_bias.as_ref().map_or(0, Vec::len);
            }
            small += l.attn.norms().into_iter().map(norm_len).sum::<usize>();
            small += l.attn.sinks.as_ref().map_or(0, Vec::len);
        }
        f(Storage::Owned(small * 4));
    }
}

/// A tensor as its source stores it: in place inside a mapped file where the bytes are
/// aligned, a copy otherwise.
pub enum Stored {
    F32(Buf<f32>),
    Half(HalfKind, Buf<u16>),
    I8(Buf<i8>),
    I32(Buf<i32>),
    U8(Buf<u8>),
}

impl Stored {
    fn dtype(&self) -> &'static str {
        match self {
            Stored::F32(_) => "F32",
            Stored::Half(HalfKind::Bf16, _) => "BF16",
            Stored::Half(HalfKind::F16, _) => "F16",
            Stored::I8(_) => "I8",
            Stored::I32(_) => "I32",
            Stored::U8(_) => "U8",
        }
    }
}

/// Where architecture loaders get tensors from: a checkpoint directory, an .emoe store or a
/// generator.
pub trait TensorSource {
    fn has(&self, name: &str) -> bool;
    /// The tensor as stored, checked against `shape`; `why` names the config fields behind the
    /// shape.
    fn stored(&self, name: &str, shape: &[usize], why: &str) -> Result<Stored>;
    /// A floating-point tensor as f32 values (a copy).
    fn tensor(&self, name: &str, shape: &[usize], why: &str) -> Result<Vec<f32>> {
        match self.stored(name, shape, why)? {
            Stored::F32(b) => Ok(b.to_vec()),
            Stored::Half(kind, b) => Ok(kind.widen(&b)),
            other => Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: other.dtype().into(),
            }),
        }
    }
    /// A matrix the source keeps in a file's own quantized blocks (a GGUF's Q4_K, Q8_0, …),
    /// checked against `shape`; `None` where the source stores `name` otherwise. The loader
    /// decides what it becomes ([`WeightForm`]).
    fn blocks(
        &self,
        _name: &str,
        _shape: &[usize],
        _why: &str,
    ) -> Result<Option<Arc<BlockMatrix>>> {
        Ok(None)
    }
    /// A stored tensor's shape, where the source can tell without reading it (an .emoe's
    /// directory): the int4 group size is part of the shape.
    fn shape_of(&self, _name: &str) -> Option<Vec<usize>> {
        None
    }
    /// The block of a mapped store that holds expert `expert` of layer `layer`, if any.
    fn expert_block(&self, _layer: usize, _expert: usize) -> Option<Arc<StoredBlock>> {
        None
    }
}

/// How a loader turns stored weights into the kernels' forms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightForm {
    /// As stored where a kernel reads that layout (bf16/f16 and mapped tables in place); a
    /// file's quantized blocks (GGUF) converted at load, a matrix at a time, to weight-only
    /// int8 rows (routers and the shared-expert gate, which stay f32 in an .emoe too, to f32).
    #[default]
    AsStored,
    /// Every floating-point weight widened to f32 (the quantizer edits f32 weights).
    F32,
    /// Every matrix exactly as stored, f32 ones and quantized blocks too (not packed, not
    /// decoded): the quantizer takes one layer at a time from the file. Embedding tables in
    /// quantized blocks are decoded to f32 (calibration looks rows up).
    InPlace,
}

/// Helpers shared by the architecture loaders.
pub struct Loader<'a> {
    pub src: &'a dyn TensorSource,
    pub form: WeightForm,
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
        self.linear_as(prefix, (out, inp), bias, false, why)
    }

    /// An embedding table (looked up a row per token; backends keep it row-major).
    pub fn embedding(&self, prefix: &str, out: usize, inp: usize, why: &str) -> Result<Linear> {
        self.linear_as(prefix, (out, inp), false, true, why)
    }

    /// What a matrix in a file's quantized blocks becomes (see [`WeightForm`]).
    pub(crate) fn block_weight(
        &self,
        b: Arc<BlockMatrix>,
        prefix: &str,
        table: bool,
    ) -> Result<LinearWeight> {
        let decoded = |b: &BlockMatrix| {
            let rows = b.to_rows();
            b.release();
            LinearWeight::F32Rows(rows.into())
        };
        Ok(match self.form {
            WeightForm::F32 => decoded(&b),
            WeightForm::InPlace if table => decoded(&b),
            WeightForm::InPlace => LinearWeight::Prepared(b),
            WeightForm::AsStored if !crate::quant::is_quantized_layer(prefix) => decoded(&b),
            WeightForm::AsStored => {
                let m = b.to_int8().map_err(|e| {
                    Error::invalid(format!(
                        "{prefix}: converting {} blocks to int8: {e}",
                        b.ggml_type().name()
                    ))
                })?;
                LinearWeight::Int8WeightOnly(m)
            }
        })
    }

    fn linear_as(
        &self,
        prefix: &str,
        (out, inp): (usize, usize),
        bias: bool,
        table: bool,
        why: &str,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.src.tensor(&format!("{prefix}.bias"), &[out], why)?)
        } else {
            None
        };
        let qname = format!("{prefix}.qweight");
        let wname = format!("{prefix}.weight");
        let weight = if self.src.has(&qname) {
            self.int8_weight(prefix, out, inp, why)?
        } else if self.src.shape_of(&format!("{prefix}.qweight4")).is_some() {
            self.int4_weight(prefix, out, inp, why)?
        } else if let Some(b) = self.src.blocks(&wname, &[out, inp], why)? {
            self.block_weight(b, prefix, table)?
        } else {
            match (self.src.stored(&wname, &[out, inp], why)?, self.form) {
                (Stored::Half(kind, w), WeightForm::AsStored | WeightForm::InPlace) => {
                    LinearWeight::Half(kind, w)
                }
                (Stored::Half(kind, w), WeightForm::F32) => {
                    LinearWeight::F32Rows(kind.widen(&w).into())
                }
                (Stored::F32(w), _) => LinearWeight::F32Rows(w),
                (other, _) => {
                    return Err(Error::UnsupportedDtype {
                        name: wname,
                        dtype: other.dtype().into(),
                    })
                }
            }
        };
        let scale_name = format!("{prefix}.input_scale");
        let input_scale = if self.src.has(&scale_name) {
            Some(self.src.tensor(&scale_name, &[inp], why)?)
        } else {
            None
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

    /// `prefix.qweight` (int8, rows padded to the kernels' `padded_k`), `prefix.scales` (f32) and
    /// `prefix.row_sums` (i32), all used in place; `prefix.weight_only` marks f32 activations.
    fn int8_weight(&self, prefix: &str, out: usize, inp: usize, why: &str) -> Result<LinearWeight> {
        let qname = format!("{prefix}.qweight");
        let int8 = |name: String, stored: Stored| -> Result<Stored> {
            match stored {
                s @ (Stored::I8(_) | Stored::I32(_) | Stored::F32(_)) => Ok(s),
                other => Err(Error::UnsupportedDtype {
                    name,
                    dtype: other.dtype().into(),
                }),
            }
        };
        let kp = padded_k(inp);
        let data = int8(qname.clone(), self.src.stored(&qname, &[out, kp], why)?)?;
        let sname = format!("{prefix}.scales");
        let scales = int8(sname.clone(), self.src.stored(&sname, &[out], why)?)?;
        let rname = format!("{prefix}.row_sums");
        let sums = int8(rname.clone(), self.src.stored(&rname, &[out], why)?)?;
        let (Stored::I8(data), Stored::F32(scales), Stored::I32(sums)) = (data, scales, sums)
        else {
            return Err(Error::invalid(format!(
                "{qname}: expected I8 weights, F32 scales and I32 row sums"
            )));
        };
        let matrix = Int8Matrix::from_parts(out, inp, data, scales, sums)
            .map_err(|e| Error::invalid(format!("{qname}: {e}")))?;
        // A marker tensor says the activations stay f32 (weight-only int8).
        Ok(if self.src.has(&format!("{prefix}.weight_only")) {
            LinearWeight::Int8WeightOnly(matrix)
        } else {
            LinearWeight::Int8(matrix)
        })
    }

    /// `prefix.qweight4` (U8, `[rows padded to 16, groups, group / 2]`: the group size is in
    /// the shape), `prefix.scales4` (F16, `[tiles, groups, 16]`) and, for an asymmetric matrix,
    /// `prefix.zeros4` (U8, like the scales), all used in place (see [`Int4Matrix`]).
    fn int4_weight(&self, prefix: &str, out: usize, inp: usize, why: &str) -> Result<LinearWeight> {
        use crate::model::int4::{int4_padded_k, TILE_ROWS};
        let qname = format!("{prefix}.qweight4");
        let group = match self.src.shape_of(&qname).as_deref() {
            Some(&[_, _, half]) => 2 * half,
            _ => {
                return Err(Error::invalid(format!(
                    "{qname}: expected a [rows, groups, group / 2] int4 tensor"
                )))
            }
        };
        if !crate::model::int4::GROUP_SIZES.contains(&group) {
            return Err(Error::invalid(format!(
                "{qname}: int4 group size {group}; expected one of {:?}",
                crate::model::int4::GROUP_SIZES
            )));
        }
        let (tiles, groups) = (out.div_ceil(TILE_ROWS), int4_padded_k(inp, group) / group);
        let data = self
            .src
            .stored(&qname, &[tiles * TILE_ROWS, groups, group / 2], why)?;
        let sname = format!("{prefix}.scales4");
        let scales = self.src.stored(&sname, &[tiles, groups, TILE_ROWS], why)?;
        let zname = format!("{prefix}.zeros4");
        let zeros = if self.src.has(&zname) {
            match self.src.stored(&zname, &[tiles, groups, TILE_ROWS], why)? {
                Stored::U8(z) => Some(z),
                other => {
                    return Err(Error::UnsupportedDtype {
                        name: zname,
                        dtype: other.dtype().into(),
                    })
                }
            }
        } else {
            None
        };
        let (Stored::U8(data), Stored::Half(HalfKind::F16, scales)) = (data, scales) else {
            return Err(Error::invalid(format!(
                "{qname}: expected U8 int4 weights and F16 scales"
            )));
        };
        let matrix = Int4Matrix::from_parts(out, inp, group, data, scales, zeros)
            .map_err(|e| Error::invalid(format!("{qname}: {e}")))?;
        Ok(LinearWeight::Int4(matrix))
    }

    /// An expert's gated MLP under `prefix` with the given projection names; its weights'
    /// block (in a mapped store) is attached so it is verified on first use.
    #[allow(clippy::too_many_arguments)]
    pub fn expert(
        &self,
        (layer, expert): (usize, usize),
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        ffn: usize,
        why_ffn: &str,
    ) -> Result<GatedMlp> {
        let mut mlp = self.gated_mlp(prefix, [gate, up, down], hidden, ffn, why_ffn)?;
        mlp.block = self.src.expert_block(layer, expert);
        Ok(mlp)
    }

    /// A gated MLP under `prefix` with the given projection names.
    pub fn gated_mlp(
        &self,
        prefix: &str,
        [gate, up, down]: [&str; 3],
        hidden: usize,
        ffn: usize,
        why_ffn: &str,
    ) -> Result<GatedMlp> {
        let why = format!("{why_ffn} × hidden_size");
        Ok(GatedMlp::new(
            self.linear(&format!("{prefix}.{gate}"), ffn, hidden, false, &why)?,
            self.linear(&format!("{prefix}.{up}"), ffn, hidden, false, &why)?,
            self.linear(
                &format!("{prefix}.{down}"),
                hidden,
                ffn,
                false,
                &format!("hidden_size × {why_ffn}"),
            )?,
        ))
    }

    /// `rows` rows of `in_features` values from row `first_row` of a stacked tensor `stored`
    /// (named `from`), as the linear `name`: a checkpoint that keeps several matrices in one
    /// tensor (Granite's experts, `[experts, out, in]`). Mapped values stay in place.
    pub fn rows_of(
        &self,
        stored: &Stored,
        from: &str,
        name: &str,
        first_row: usize,
        (rows, in_features): (usize, usize),
    ) -> Result<Linear> {
        let (start, len) = (first_row * in_features, rows * in_features);
        let outside = || Error::invalid(format!("{from}: rows {first_row}+{rows} lie outside it"));
        let weight = match (stored, self.form) {
            (Stored::Half(kind, w), WeightForm::AsStored | WeightForm::InPlace) => {
                LinearWeight::Half(*kind, w.slice(start, len).ok_or_else(outside)?)
            }
            (Stored::Half(kind, w), WeightForm::F32) => {
                let part = w.slice(start, len).ok_or_else(outside)?;
                LinearWeight::F32Rows(kind.widen(&part).into())
            }
            (Stored::F32(w), _) => LinearWeight::F32Rows(w.slice(start, len).ok_or_else(outside)?),
            (other, _) => {
                return Err(Error::UnsupportedDtype {
                    name: from.to_string(),
                    dtype: other.dtype().into(),
                })
            }
        };
        Ok(Linear {
            name: name.to_string(),
            out_features: rows,
            in_features,
            weight,
            bias: None,
            input_scale: None,
        })
    }

    pub fn vector(&self, name: &str, len: usize, why: &str) -> Result<Vec<f32>> {
        self.src.tensor(name, &[len], why)
    }

    pub fn rms_norm(&self, prefix: &str, dim: usize, eps: f32) -> Result<Norm> {
        self.rms_norm_of(prefix, dim, eps, "hidden_size")
    }

    /// An RMSNorm of `dim` values; `why` names the config fields that give `dim`.
    pub fn rms_norm_of(&self, prefix: &str, dim: usize, eps: f32, why: &str) -> Result<Norm> {
        Ok(Norm::Rms {
            name: prefix.to_string(),
            weight: self.vector(&format!("{prefix}.weight"), dim, why)?,
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
