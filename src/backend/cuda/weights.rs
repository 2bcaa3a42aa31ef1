//! The model's weights on the device, found again by their stable name (the checkpoint prefix,
//! unique in a model: checked at load), never by where the host copy lives: a paged expert
//! arrives in a fresh host buffer each time, at addresses that get reused. Non-expert weights
//! upload once; routed experts come and go with the expert tier (`admit`, `release`). W8A8
//! matrices keep their stored layout; every other linear form is widened to f32 rows, as the
//! CPU's kernels widen it in registers.

use super::copier::ExpertCopier;
use super::device::Gpu;
use super::kernels::{DeviceInt4, DeviceInt8};
use crate::error::Result;
use crate::model::weights::{Linear, LinearWeight, Norm};
use cudarc::driver::CudaSlice;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub enum DeviceWeight {
    Int8(DeviceInt8),
    Int4(DeviceInt4),
    /// `n × k` f32 rows.
    F32(CudaSlice<f32>),
}

pub struct DeviceLinear {
    pub n: usize,
    pub k: usize,
    pub weight: DeviceWeight,
    pub bias: Option<CudaSlice<f32>>,
    pub input_scale: Option<CudaSlice<f32>>,
}

pub struct DeviceNorm {
    pub weight: CudaSlice<f32>,
    /// Layer norm's bias; `None` for RMS norm.
    pub bias: Option<CudaSlice<f32>>,
    pub eps: f32,
}

/// Embedding rows as f32, `rows × dim`.
pub struct DeviceTable {
    pub data: CudaSlice<f32>,
    pub rows: usize,
}

/// Row-major `n × k` f32 of any non-W8A8 weight form, as the CPU reads it.
fn f32_rows(lin: &Linear) -> Vec<f32> {
    let (n, k) = (lin.out_features, lin.in_features);
    match &lin.weight {
        LinearWeight::Prepared(w) => w.to_rows(),
        LinearWeight::F32Rows(w) => w.to_vec(),
        LinearWeight::Half(kind, w) => w.iter().map(|&b| kind.to_f32(b)).collect(),
        LinearWeight::Int8(m) | LinearWeight::Int8WeightOnly(m) => (0..n)
            .flat_map(|j| m.row(j)[..k].iter().map(move |&q| q as f32 * m.scales[j]))
            .collect(),
        LinearWeight::Int4(m) => (0..n).flat_map(|j| m.dequantize_row(j)).collect(),
    }
}

fn norm_name(norm: &Norm) -> &str {
    match norm {
        Norm::Rms { name, .. } | Norm::Layer { name, .. } => name,
    }
}

/// Device copies by tensor name, uploaded on first use.
#[derive(Default)]
pub struct WeightCache {
    linears: Mutex<HashMap<String, Arc<DeviceLinear>>>,
    norms: Mutex<HashMap<String, Arc<DeviceNorm>>>,
    tables: Mutex<HashMap<String, Arc<DeviceTable>>>,
}

impl WeightCache {
    pub fn linear(&self, gpu: &Gpu, lin: &Linear) -> Result<Arc<DeviceLinear>> {
        self.linear_via(gpu, lin, None)
    }

    /// [`Self::linear`], with int8 weights copied through `copier`'s page-locked ring on its
    /// copy stream when given (a fetched expert).
    pub fn linear_via(
        &self,
        gpu: &Gpu,
        lin: &Linear,
        copier: Option<&ExpertCopier>,
    ) -> Result<Arc<DeviceLinear>> {
        let mut map = self.linears.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&lin.name) {
            return Ok(d.clone());
        }
        let (n, k) = (lin.out_features, lin.in_features);
        let weight = match &lin.weight {
            LinearWeight::Int8(m) => DeviceWeight::Int8(DeviceInt8 {
                n,
                k,
                k_padded: m.k_padded,
                data: match copier {
                    Some(c) => c.upload_i8(gpu, &m.data[..], &lin.name)?,
                    None => gpu.upload(&m.data[..], &lin.name)?,
                },
                scales: gpu.upload(&m.scales[..], &lin.name)?,
            }),
            LinearWeight::Int4(m) => DeviceWeight::Int4(DeviceInt4 {
                n,
                k,
                k_padded: m.k_padded,
                group: m.group,
                data: gpu.upload(&m.data[..], &lin.name)?,
                scales: gpu.upload(&m.scales[..], &lin.name)?,
                zeros: match &m.zeros {
                    Some(z) => Some(gpu.upload(&z[..], &lin.name)?),
                    None => None,
                },
            }),
            _ => DeviceWeight::F32(gpu.upload(&f32_rows(lin), &lin.name)?),
        };
        let opt = |v: &Option<Vec<f32>>| v.as_deref().map(|b| gpu.upload(b, &lin.name)).transpose();
        let d = Arc::new(DeviceLinear {
            n,
            k,
            weight,
            bias: opt(&lin.bias)?,
            input_scale: opt(&lin.input_scale)?,
        });
        map.insert(lin.name.clone(), d.clone());
        Ok(d)
    }

    pub fn norm(&self, gpu: &Gpu, norm: &Norm) -> Result<Arc<DeviceNorm>> {
        let mut map = self.norms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(norm_name(norm)) {
            return Ok(d.clone());
        }
        let d = Arc::new(match norm {
            Norm::Rms { name, weight, eps } => DeviceNorm {
                weight: gpu.upload(weight, name)?,
                bias: None,
                eps: *eps,
            },
            Norm::Layer {
                name,
                weight,
                bias,
                eps,
            } => DeviceNorm {
                weight: gpu.upload(weight, name)?,
                bias: Some(gpu.upload(bias, name)?),
                eps: *eps,
            },
        });
        map.insert(norm_name(norm).to_string(), d.clone());
        Ok(d)
    }

    /// An embedding table (any stored form) as f32 rows: `table.out_features` rows of
    /// `table.in_features`, dequantized as the CPU's lookup does.
    pub fn embedding(&self, gpu: &Gpu, table: &Linear) -> Result<Arc<DeviceTable>> {
        let mut map = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = map.get(&table.name) {
            return Ok(d.clone());
        }
        let d = Arc::new(DeviceTable {
            data: gpu.upload(&f32_rows(table), &table.name)?,
            rows: table.out_features,
        });
        map.insert(table.name.clone(), d.clone());
        Ok(d)
    }

    /// A plain f32 table (learned positions), `dim` floats a row.
    pub fn rows(&self, gpu: &Gpu, table: &[f32], dim: usize) -> Result<Arc<DeviceTable>> {
        let mut map = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        // A model has one learned position table.
        let k = "position table".to_string();
        if let Some(d) = map.get(&k) {
            return Ok(d.clone());
        }
        let d = Arc::new(DeviceTable {
            data: gpu.upload(table, "position table")?,
            rows: table.len() / dim.max(1),
        });
        map.insert(k, d.clone());
        Ok(d)
    }

    /// Bytes of an uploaded linear's device copy.
    pub fn linear_bytes(d: &DeviceLinear) -> usize {
        let w = match &d.weight {
            DeviceWeight::Int8(m) => m.n * m.k_padded + m.n * 4,
            DeviceWeight::Int4(m) => {
                m.data.len() + 2 * m.scales.len() + m.zeros.as_ref().map_or(0, |z| z.len())
            }
            DeviceWeight::F32(_) => d.n * d.k * 4,
        };
        w + 4 * (d.bias.as_ref().map_or(0, |_| d.n) + d.input_scale.as_ref().map_or(0, |_| d.k))
    }

    /// Drops the device copy of the linear named `name` (an expert leaving its slot); the
    /// memory returns to the device when no running step still holds it.
    pub fn release_linear(&self, name: &str) {
        self.linears
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// Uploads every weight of `model` now, so a step never allocates weights (and running
    /// out of device memory is an error at load, naming the tensor).
    /// With `routed_experts` false the routed experts are left to the expert tier.
    pub fn preload(&self, gpu: &Gpu, model: &crate::Model, routed_experts: bool) -> Result<()> {
        use crate::model::weights::Ffn;
        let w = &model.weights;
        check_unique_names(model)?;
        self.embedding(gpu, &w.embed)?;
        for lin in [&w.project_in, &w.head_transform, &w.project_out]
            .into_iter()
            .flatten()
        {
            self.linear(gpu, lin)?;
        }
        self.linear(gpu, w.head())?;
        if let Some(n) = &w.final_norm {
            self.norm(gpu, n)?;
        }
        for layer in &w.layers {
            self.norm(gpu, &layer.attn_norm)?;
            self.norm(gpu, &layer.ffn_norm)?;
            for lin in layer.attn.projections() {
                self.linear(gpu, lin)?;
            }
            let mlps: Vec<&crate::model::weights::GatedMlp> = match &layer.ffn {
                Ffn::Moe(b) => {
                    self.linear(gpu, &b.router)?;
                    if let Some(gate) = b.shared.as_ref().and_then(|s| s.gate.as_ref()) {
                        self.linear(gpu, gate)?;
                    }
                    let routed = b.experts.iter().filter(|_| routed_experts);
                    routed.chain(b.shared.iter().map(|s| &s.mlp)).collect()
                }
                Ffn::Gated(m) => vec![m],
                Ffn::Plain(m) => {
                    self.linear(gpu, &m.fc1)?;
                    self.linear(gpu, &m.fc2)?;
                    vec![]
                }
            };
            for m in mlps {
                for lin in [&m.gate, &m.up, &m.down] {
                    self.linear(gpu, lin)?;
                }
            }
        }
        Ok(())
    }
}

/// Device copies are found by name, so two different tensors under one name would silently
/// share a copy: refuse such a model.
fn check_unique_names(model: &crate::Model) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let dup = model
        .weights
        .linears()
        .into_iter()
        .find(|lin| !seen.insert(lin.name.as_str()));
    match dup.map(|lin| &lin.name) {
        Some(name) => Err(crate::error::Error::invalid(format!(
            "the CUDA backend finds weights by name, and two tensors are named {name:?}"
        ))),
        None => Ok(()),
    }
}
