//! [`CudaBackend`]: the forward pass's ops on the device, on one compute stream. Activations
//! stay on the device from the embedding gather to the logits; the host sees the routing
//! picks (the [`Backend`] trait returns them). Keys and values stay there too, in each layer
//! cache's device storage (kv.rs); the host keeps their positions.
//!
//! The trait's ops return values, not results, so a device failure inside a step (a launch
//! error, running out of memory for activations) ends the step through
//! [`crate::backend::health::fail_step`] with one line naming the op and how much was asked;
//! `Engine::forward` returns it as that step's error. Weights, the large part, are uploaded by
//! [`CudaBackend::new`], whose errors are ordinary ones.

use super::device::Gpu;
use super::kernels::{activation_id, AttnShape, GemmKernel, OutType, QuantAct, MAX_ROUTED_EXPERTS};
use super::kv::DeviceKv;
use super::weights::{DeviceWeight, WeightCache};
use crate::backend::cpu::routing::route_rows;
use crate::backend::{AttentionShape, Backend, DeviceTiming, ExpertWork, Pick, Segment, Tasks};
use crate::error::{Error, Result};
use crate::kv::{KvLayout, KvStorage, LayerCache};
use crate::model::config::Activation;
use crate::model::weights::{GatedMlp, Linear, LinearWeight, Norm};
use cudarc::driver::{sys, CudaEvent, CudaSlice, CudaStream};
use std::borrow::Cow;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// `rows × cols` f32 activations on the device, with the int8 form a fused norm made of them.
pub struct DeviceRows {
    pub data: CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
    quant: Option<Arc<QuantAct>>,
}

impl DeviceRows {
    /// A device copy of host rows (`cols` values a row).
    pub fn from_host(backend: &CudaBackend, data: &[f32], cols: usize) -> DeviceRows {
        let rows = data.len() / cols.max(1);
        DeviceRows::new(
            must_on(&backend.gpu, backend.gpu.upload(data, "activations")),
            rows,
            cols,
        )
    }

    fn new(data: CudaSlice<f32>, rows: usize, cols: usize) -> DeviceRows {
        DeviceRows {
            data,
            rows,
            cols,
            quant: None,
        }
    }
}

/// RoPE angles of a step's rows, `(cos, sin)` pairs, `half` a row.
pub struct DeviceRope {
    cos_sin: CudaSlice<f32>,
    half: usize,
    rows: usize,
}

pub struct CudaBackend {
    /// Shared with the KV storages this backend makes (they grow and compact themselves).
    gpu: Arc<Gpu>,
    weights: WeightCache,
    /// The copy stream and staging ring of fetched experts, made on the first fetch (a second
    /// stream turns on cudarc's per-buffer event tracking, which a whole-model run needs not).
    copier: std::sync::OnceLock<Result<super::copier::ExpertCopier>>,
    /// Norms also quantize their output for the W8A8 linear that follows (the model's
    /// attention projections are W8A8 without an input scale).
    fuse_norm_quant: bool,
}

/// Two timing events on one stream around queued expert work: the stream's time from the first
/// to the second, read once the second has completed (queried, never waited for).
struct EventSpan {
    start: CudaEvent,
    end: CudaEvent,
}

impl EventSpan {
    fn mark(stream: &CudaStream) -> Option<CudaEvent> {
        // cudarc's default flags disable timing.
        stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
    }
}

impl DeviceTiming for EventSpan {
    fn poll(&self) -> Poll<Option<Duration>> {
        if self.end.context().bind_to_thread().is_err() {
            return Poll::Ready(None);
        }
        match self.end.try_is_complete() {
            Ok(false) => Poll::Pending,
            // Both events have completed, so reading the time waits for nothing.
            Ok(true) => Poll::Ready(
                self.start
                    .elapsed_ms(&self.end)
                    .ok()
                    .filter(|ms| ms.is_finite() && *ms >= 0.0)
                    .map(|ms| Duration::from_secs_f64(f64::from(ms) / 1e3)),
            ),
            Err(_) => Poll::Ready(None),
        }
    }
}

/// A device failure inside a step: see the module comment. When the device cannot even finish
/// its queued work afterwards, the failure is sticky (a faulted context refuses every later
/// call), so it is recorded for `serve` and the C API to report ([`crate::backend::health`]).
fn must_on<T>(gpu: &Gpu, r: Result<T>) -> T {
    r.unwrap_or_else(|e| {
        if let Err(after) = gpu.sync("checking the device after a failure") {
            crate::backend::health::mark_unusable(format!(
                "the GPU failed and cannot recover ({e}; then {after}): restart edgemoe"
            ));
        }
        crate::backend::health::fail_step(e)
    })
}

/// Names an attention call and its sizes in an error.
fn attention_op(q: &DeviceRows, segments: &[Segment]) -> String {
    let slots: usize = segments.iter().map(|s| s.cache.len()).sum();
    format!(
        "attention of {} query rows × {} over {} sequences, {slots} cached slots",
        q.rows,
        q.cols,
        segments.len()
    )
}

/// `e` with the op that failed (and its sizes) in front, keeping its kind (out of memory stays
/// out of memory).
fn naming_op(op: String, e: Error) -> Error {
    match e {
        Error::OutOfMemory(m) => Error::OutOfMemory(format!("{op}: {m}")),
        Error::Cuda(m) => Error::Cuda(format!("{op}: {m}")),
        other => Error::Cuda(format!("{op}: {other}")),
    }
}

/// Why the CUDA backend refuses attention with sink logits (GPT-OSS): its kernel has none, and
/// would compute another model's numbers without them.
const SINKS_UNSUPPORTED: &str = "the CUDA backend does not run attention sinks (GPT-OSS); \
     use --backend cpu";

/// Why the GPU cannot run a model of `cfg`, or `None`: attention sinks (GPT-OSS) have no kernel,
/// and multi-head latent attention (DeepSeek-V2/V3) has not been run on a device; both are
/// refused rather than risk wrong numbers.
pub fn unsupported_model(cfg: &crate::model::config::ModelConfig) -> Option<String> {
    let name = cfg.arch.hf_name();
    if cfg.options.attention_sinks {
        return Some(format!("{name}: {SINKS_UNSUPPORTED}"));
    }
    cfg.options.mla.is_some().then(|| {
        format!(
            "{name}: multi-head latent attention has no CUDA path yet; run it with --backend cpu"
        )
    })
}

impl CudaBackend {
    /// Device 0 with every weight of `model` resident.
    pub fn new(model: &crate::Model) -> Result<CudaBackend> {
        CudaBackend::with_weights(model, true)
    }

    /// Device 0 with every weight of `model` resident but the routed experts, which the expert
    /// tier admits and releases.
    pub fn for_tier(model: &crate::Model) -> Result<CudaBackend> {
        CudaBackend::with_weights(model, false)
    }

    fn with_weights(model: &crate::Model, routed_experts: bool) -> Result<CudaBackend> {
        if let Some(why) = unsupported_model(&model.config) {
            return Err(crate::error::Error::invalid(why));
        }
        let backend = CudaBackend::open()?;
        backend
            .weights
            .preload(&backend.gpu, model, routed_experts)?;
        backend.gpu.sync("uploading the model")?;
        let fuse = model.weights.layers.first().is_some_and(|l| {
            matches!(l.attn.q.weight, LinearWeight::Int8(_)) && l.attn.q.input_scale.is_none()
        });
        Ok(CudaBackend {
            fuse_norm_quant: fuse,
            ..backend
        })
    }

    /// Device 0 with no weights yet (they upload on first use).
    pub fn open() -> Result<CudaBackend> {
        Ok(CudaBackend {
            gpu: Arc::new(Gpu::open(0)?),
            weights: WeightCache::default(),
            copier: std::sync::OnceLock::new(),
            fuse_norm_quant: false,
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// `r`'s value, or the end of the step with its error prefixed by `op` (the op and its
    /// sizes, formatted only on failure).
    fn must<T>(&self, op: impl FnOnce() -> String, r: Result<T>) -> T {
        must_on(&self.gpu, r.map_err(|e| naming_op(op(), e)))
    }

    fn act(&self, data: CudaSlice<f32>, rows: usize, cols: usize) -> DeviceRows {
        DeviceRows::new(data, rows, cols)
    }

    fn try_linear(&self, lin: &Linear, x: &DeviceRows) -> Result<DeviceRows> {
        let d = self.weights.linear(&self.gpu, lin)?;
        let rows = x.rows;
        let data = match &d.weight {
            DeviceWeight::Int8(w) => {
                let fresh;
                let q = match &x.quant {
                    Some(q) if d.input_scale.is_none() && q.k == d.k => q.as_ref(),
                    _ => {
                        fresh =
                            self.gpu
                                .quantize(&x.data, rows, d.k, None, d.input_scale.as_ref())?;
                        &fresh
                    }
                };
                let mut out = self.gpu.zeros::<f32>(rows * d.n, &lin.name)?;
                self.gpu.gemm_w8a8(
                    GemmKernel::Auto,
                    q,
                    w,
                    d.bias.as_ref(),
                    OutType::F32,
                    &mut out,
                    None,
                )?;
                out
            }
            DeviceWeight::Int4(w) => {
                let fresh;
                let q = match &x.quant {
                    Some(q) if d.input_scale.is_none() && q.k == d.k => q.as_ref(),
                    _ => {
                        fresh =
                            self.gpu
                                .quantize(&x.data, rows, d.k, None, d.input_scale.as_ref())?;
                        &fresh
                    }
                };
                self.gpu.gemm_w4a8(q, w, d.bias.as_ref())?
            }
            DeviceWeight::F32(w) => match &d.input_scale {
                Some(s) => {
                    let xs = self.gpu.scale_cols(&x.data, rows, d.k, s)?;
                    self.gpu.gemm_f32(&xs, rows, d.k, w, d.n, d.bias.as_ref())?
                }
                None => self
                    .gpu
                    .gemm_f32(&x.data, rows, d.k, w, d.n, d.bias.as_ref())?,
            },
        };
        Ok(self.act(data, rows, d.n))
    }

    fn try_norm(&self, norm: &Norm, x: &DeviceRows) -> Result<DeviceRows> {
        let d = self.weights.norm(&self.gpu, norm)?;
        if self.fuse_norm_quant && d.bias.is_none() {
            let mut normed = self.gpu.zeros::<f32>(x.rows * x.cols, "norm output")?;
            let q = self.gpu.quantize(
                &x.data,
                x.rows,
                x.cols,
                Some((&d.weight, d.eps, &mut normed)),
                None,
            )?;
            let mut out = self.act(normed, x.rows, x.cols);
            out.quant = Some(Arc::new(q));
            return Ok(out);
        }
        let data = self
            .gpu
            .norm(&x.data, x.rows, x.cols, &d.weight, d.bias.as_ref(), d.eps)?;
        Ok(self.act(data, x.rows, x.cols))
    }

    fn try_append_kv(
        &self,
        cache: &mut LayerCache,
        k: &DeviceRows,
        v: &DeviceRows,
        rows: std::ops::Range<usize>,
        positions: &[usize],
    ) -> Result<()> {
        let kv_dim = k.cols;
        let span = rows.start * kv_dim..rows.end * kv_dim;
        let pos = &positions[rows];
        let adopt = |other: Option<&dyn KvStorage>, held: &[u32]| {
            DeviceKv::adopt(self.gpu.clone(), kv_dim, other, held)
        };
        let write = |own: &mut DeviceKv| {
            own.append(k.data.slice(span.clone()), v.data.slice(span.clone()), pos)
        };
        cache.append_with(pos, adopt, write)
    }

    /// Attention of every segment's rows over its cache; with `want_mass`, also the mass each
    /// slot received from each row (mean over the heads), laid out as
    /// [`Backend::attention_with_mass`] returns it. The kernel sums its mass over all the rows
    /// of a call, so a row that wants its own runs alone.
    fn try_attention(
        &self,
        shape: &AttentionShape,
        q: &DeviceRows,
        positions: &[usize],
        segments: &[Segment],
        want_mass: bool,
    ) -> Result<(DeviceRows, usize, Vec<f32>)> {
        if shape.sink_logits.is_some() {
            return Err(crate::Error::invalid(SINKS_UNSUPPORTED));
        }
        let qd = shape.num_heads * shape.head_dim;
        let kv_dim = shape.num_kv_heads * shape.head_dim;
        let mut out = self.gpu.zeros::<f32>(q.rows * qd, "attention output")?;
        let mut slots_read = 0;
        let mut mass = Vec::new();
        let geometry = AttnShape {
            num_heads: shape.num_heads,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            window: shape.sliding_window.unwrap_or(0),
            split_len: 0,
        };
        for seg in segments {
            let cache = seg.cache;
            for &p in &positions[seg.rows.clone()] {
                slots_read += cache
                    .positions()
                    .iter()
                    .filter(|&&s| {
                        let s = s as usize;
                        s <= p && shape.sliding_window.is_none_or(|w| p - s < w)
                    })
                    .count();
            }
            // A cache this backend has not appended to is read through a device copy.
            let adopted;
            let kv = match cache.storage_as::<DeviceKv>() {
                Some(own) => own,
                None => {
                    adopted = DeviceKv::adopt(
                        self.gpu.clone(),
                        kv_dim,
                        cache.storage(),
                        cache.positions(),
                    )?;
                    &adopted
                }
            };
            if kv.kv_dim() != kv_dim {
                return Err(crate::Error::invalid(format!(
                    "attention over a KV cache of {} floats a slot with {kv_dim} expected",
                    kv.kv_dim()
                )));
            }
            let n = cache.len();
            // One call for the segment, or one per row where each row's mass is wanted.
            let calls: Vec<std::ops::Range<usize>> = if want_mass {
                seg.rows.clone().map(|r| r..r + 1).collect()
            } else {
                vec![seg.rows.clone()]
            };
            for rows in calls {
                let span = rows.start * qd..rows.end * qd;
                // No slots: the rows' output stays zero, and so does their mass.
                let Some(inputs) = kv.attn_inputs(q.data.slice(span.clone()), &positions[rows])
                else {
                    mass.resize(mass.len() + if want_mass { n } else { 0 }, 0.0);
                    continue;
                };
                let mut view = out.slice_mut(span);
                if want_mass {
                    let mut row_mass = self.gpu.zeros::<f32>(n, "attention mass")?;
                    self.gpu
                        .attention(geometry, &inputs, &mut view, Some(&mut row_mass))?;
                    let heads = shape.num_heads as f32;
                    let summed = self.gpu.download(&row_mass, n, "attention mass")?;
                    mass.extend(summed.iter().map(|m| m / heads));
                } else {
                    self.gpu.attention(geometry, &inputs, &mut view, None)?;
                }
            }
        }
        if shape.value_dim < shape.head_dim {
            // The kernel writes head_dim floats a head, reading a key-prefix layout's whole key
            // row as the value: keep each head's first value_dim (through the host, as the
            // latent attention's other reshapes go).
            let full = self.gpu.download(&out, q.rows * qd, "attention output")?;
            let narrow: Vec<f32> = full
                .chunks_exact(shape.head_dim)
                .flat_map(|head| head[..shape.value_dim].iter().copied())
                .collect();
            let cols = shape.num_heads * shape.value_dim;
            let data = self.gpu.upload(&narrow, "attention output")?;
            return Ok((self.act(data, q.rows, cols), slots_read, mass));
        }
        Ok((self.act(out, q.rows, qd), slots_read, mass))
    }

    fn try_route(
        &self,
        logits: &DeviceRows,
        top_k: usize,
        renormalize: bool,
        first_row: usize,
    ) -> Result<Vec<Pick>> {
        let (rows, experts) = (logits.rows, logits.cols);
        if experts > MAX_ROUTED_EXPERTS || top_k == 0 || top_k > experts {
            // More experts than the device router takes: route on the host.
            let host = self
                .gpu
                .download(&logits.data, rows * experts, "router logits")?;
            return Ok(route_rows(&host, experts, top_k, renormalize, first_row));
        }
        let (ids, ws) = self
            .gpu
            .route(&logits.data, rows, experts, top_k, renormalize)?;
        let ids = self.gpu.download(&ids, rows * top_k, "routed experts")?;
        let ws = self.gpu.download(&ws, rows * top_k, "routing weights")?;
        Ok(ids
            .iter()
            .zip(&ws)
            .enumerate()
            .map(|(i, (&e, &w))| Pick {
                expert: e as usize,
                row: first_row + i / top_k,
                weight: w,
            })
            .collect())
    }

    fn try_concat(&self, parts: Vec<DeviceRows>) -> Result<DeviceRows> {
        let cols = parts.first().map_or(1, |p| p.cols);
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        let mut out = self.gpu.zeros::<f32>(rows * cols, "concatenated rows")?;
        let mut at = 0;
        for p in &parts {
            let n = p.rows * cols;
            if n > 0 {
                self.gpu
                    .stream
                    .memcpy_dtod(&p.data.slice(0..n), &mut out.slice_mut(at..at + n))
                    .map_err(|e| super::device::driver_error("concatenating rows", e))?;
            }
            at += n;
        }
        Ok(self.act(out, rows, cols))
    }
}

impl Backend for CudaBackend {
    type Act = DeviceRows;
    type Rope = DeviceRope;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn threads(&self) -> usize {
        1
    }

    fn paged_experts_unsupported(&self) -> Option<&'static str> {
        // Device copies are found by name, so a paged expert finds its own copy; but without
        // the GPU tier's slot budget every expert ever paged would stay on the device.
        Some("without the GPU expert tier every expert stays on the device, so there is nothing to page; give --gpu-mem too")
    }

    fn upload_rows(&self, data: Vec<f32>, cols: usize) -> DeviceRows {
        DeviceRows::from_host(self, &data, cols)
    }

    fn admit_expert(&self, mlp: &GatedMlp) -> Result<usize> {
        let copier = self
            .copier
            .get_or_init(|| super::copier::ExpertCopier::new(&self.gpu))
            .as_ref()
            .map_err(|e| crate::error::Error::invalid(e.to_string()))?;
        let mut bytes = 0;
        for lin in [&mlp.gate, &mlp.up, &mlp.down] {
            let d = self.weights.linear_via(&self.gpu, lin, Some(copier))?;
            bytes += WeightCache::linear_bytes(&d);
        }
        Ok(bytes)
    }

    fn release_expert(&self, mlp: &GatedMlp) {
        for lin in [&mlp.gate, &mlp.up, &mlp.down] {
            self.weights.release_linear(&lin.name);
        }
    }

    fn timed<R>(
        &self,
        work: ExpertWork,
        queue: impl FnOnce() -> R,
    ) -> (R, Option<Box<dyn DeviceTiming>>) {
        let stream = match work {
            ExpertWork::Run => Some(&self.gpu.stream),
            ExpertWork::Copy => self
                .copier
                .get_or_init(|| super::copier::ExpertCopier::new(&self.gpu))
                .as_ref()
                .ok()
                .map(super::copier::ExpertCopier::stream),
        };
        // A copy's span is the copy stream's time from the first staged block to the last
        // landed one (gaps while the host fills a staging buffer included: what a fetch costs).
        // Only int8 blocks use the copy stream; scales and other forms go with the compute
        // stream and are not in it. An event that cannot be recorded costs the measurement,
        // never the work.
        let start = stream.and_then(|s| EventSpan::mark(s));
        let out = queue();
        let span = stream.zip(start).and_then(|(s, start)| {
            Some(EventSpan {
                start,
                end: EventSpan::mark(s)?,
            })
        });
        (out, span.map(|s| Box::new(s) as Box<dyn DeviceTiming>))
    }

    fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        step()
    }

    fn rows(&self, x: &DeviceRows) -> usize {
        x.rows
    }

    fn to_host<'a>(&self, x: &'a DeviceRows) -> Cow<'a, [f32]> {
        Cow::Owned(self.must(
            || format!("to_host of {} × {} activations", x.rows, x.cols),
            self.gpu.download(&x.data, x.rows * x.cols, "activations"),
        ))
    }

    fn select_rows(&self, x: &DeviceRows, rows: &[usize]) -> DeviceRows {
        let data = self.must(
            || format!("select_rows: {} of {} × {}", rows.len(), x.rows, x.cols),
            self.gpu.gather_rows(&x.data, x.rows, x.cols, rows),
        );
        self.act(data, rows.len(), x.cols)
    }

    fn concat_rows(&self, parts: Vec<DeviceRows>) -> DeviceRows {
        let (n, rows): (usize, usize) = (parts.len(), parts.iter().map(|p| p.rows).sum());
        let cols = parts.first().map_or(0, |p| p.cols);
        self.must(
            || format!("concat_rows: {n} parts, {rows} × {cols}"),
            self.try_concat(parts),
        )
    }

    fn embed(&self, table: &Linear, tokens: &[u32]) -> DeviceRows {
        let dim = table.in_features;
        let op = || format!("embed {} ({} tokens × {dim})", table.name, tokens.len());
        let t = self.must(op, self.weights.embedding(&self.gpu, table));
        let index: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        let data = self.must(op, self.gpu.gather_rows(&t.data, t.rows, dim, &index));
        self.act(data, tokens.len(), dim)
    }

    fn add_table_rows(&self, x: &mut DeviceRows, table: &[f32], index: &[usize]) {
        let op = || format!("add_table_rows: {} × {}", x.rows, x.cols);
        let t = self.must(op, self.weights.rows(&self.gpu, table, x.cols));
        let added = self
            .gpu
            .add_rows(&mut x.data, x.cols, &t.data, t.rows, index);
        self.must(op, added);
        x.quant = None;
    }

    fn norm(&self, norm: &Norm, x: &DeviceRows) -> DeviceRows {
        self.must(
            || format!("norm of {} × {}", x.rows, x.cols),
            self.try_norm(norm, x),
        )
    }

    fn norm_runs(&self, norm: &Norm, x: &DeviceRows, dim: usize) -> DeviceRows {
        // The norm kernel on the same buffer read as `rows·cols/dim` rows of `dim` values.
        let runs = x.rows * (x.cols / dim.max(1));
        let normed = self.weights.norm(&self.gpu, norm).and_then(|d| {
            self.gpu
                .norm(&x.data, runs, dim, &d.weight, d.bias.as_ref(), d.eps)
        });
        let data = self.must(
            || format!("norm of {} × {} in runs of {dim}", x.rows, x.cols),
            normed,
        );
        self.act(data, x.rows, x.cols)
    }

    fn linear(&self, lin: &Linear, x: &DeviceRows) -> DeviceRows {
        self.must(
            || {
                format!(
                    "linear {} ({} rows × {} → {})",
                    lin.name, x.rows, lin.in_features, lin.out_features
                )
            },
            self.try_linear(lin, x),
        )
    }

    fn rope_table(&self, head_dim: usize, theta: f32, positions: &[usize]) -> DeviceRope {
        // The CPU's angles (ops.rs: Rope), computed the same way so the rotation is identical.
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        self.rope_table_freqs(&inv_freq, 1.0, positions)
    }

    fn rope_table_freqs(&self, inv_freq: &[f32], scale: f32, positions: &[usize]) -> DeviceRope {
        let (half, head_dim) = (inv_freq.len(), 2 * inv_freq.len());
        let mut cos_sin = Vec::with_capacity(positions.len() * half * 2);
        for &p in positions {
            for &f in inv_freq {
                let a = p as f32 * f;
                // × 1.0 leaves every value as it was (plain RoPE).
                cos_sin.push(a.cos() * scale);
                cos_sin.push(a.sin() * scale);
            }
        }
        DeviceRope {
            cos_sin: self.must(
                || format!("rope_table of {} positions × {head_dim}", positions.len()),
                self.gpu.upload(&cos_sin, "RoPE table"),
            ),
            half,
            rows: positions.len(),
        }
    }

    fn apply_rope(&self, x: &mut DeviceRows, rope: &DeviceRope, first_row: usize) {
        let (rows, cols) = (x.rows, x.cols);
        let done = self.gpu.rope(
            &mut x.data,
            rows,
            cols,
            rope.half,
            &rope.cos_sin,
            rope.rows,
            first_row,
        );
        self.must(|| format!("apply_rope on {rows} × {cols}"), done);
        x.quant = None;
    }

    fn new_kv(&self, layout: KvLayout) -> Box<dyn KvStorage> {
        Box::new(DeviceKv::new(self.gpu.clone(), layout))
    }

    fn append_kv(
        &self,
        cache: &mut LayerCache,
        k: &DeviceRows,
        v: &DeviceRows,
        rows: std::ops::Range<usize>,
        positions: &[usize],
    ) {
        let (new, cols, held) = (rows.len(), k.cols, cache.len());
        let done = self.try_append_kv(cache, k, v, rows, positions);
        self.must(
            || format!("append_kv: {new} rows of {cols} to a cache of {held} slots"),
            done,
        )
    }

    fn attention(
        &self,
        shape: &AttentionShape,
        q: &DeviceRows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (DeviceRows, usize) {
        let (out, slots, _) = self.must(
            || attention_op(q, segments),
            self.try_attention(shape, q, positions, segments, false),
        );
        (out, slots)
    }

    fn attention_with_mass(
        &self,
        shape: &AttentionShape,
        q: &DeviceRows,
        positions: &[usize],
        segments: &[Segment],
    ) -> (DeviceRows, usize, Vec<f32>) {
        self.must(
            || attention_op(q, segments),
            self.try_attention(shape, q, positions, segments, true),
        )
    }

    fn activate(&self, act: Activation, x: &mut DeviceRows) {
        let (rows, cols) = (x.rows, x.cols);
        let done = self
            .gpu
            .activate(&mut x.data, rows * cols, activation_id(act));
        self.must(|| format!("activate {rows} × {cols}"), done);
        x.quant = None;
    }

    fn gated_activation(&self, act: Activation, gate: &mut DeviceRows, up: &DeviceRows) {
        let (rows, cols) = (gate.rows, gate.cols);
        let done = self
            .gpu
            .gated_act(&mut gate.data, &up.data, rows * cols, activation_id(act));
        self.must(|| format!("gated_activation {rows} × {cols}"), done);
        gate.quant = None;
    }

    fn rotate_rows(&self, x: &mut DeviceRows, block: usize) {
        let (rows, cols) = (x.rows, x.cols);
        let op = || format!("rotate_rows {rows} × {cols} in blocks of {block}");
        let done = self.gpu.hadamard(&mut x.data, rows * cols, block);
        self.must(op, done);
        if cols > block {
            x.data = self.must(op, self.gpu.mix_blocks(&x.data, rows, cols, block));
        }
        x.quant = None;
    }

    fn add(&self, x: &mut DeviceRows, y: &DeviceRows) {
        let (rows, cols) = (x.rows, x.cols);
        let done = self.gpu.add(&mut x.data, &y.data, rows * cols);
        self.must(|| format!("add {rows} × {cols}"), done);
        x.quant = None;
    }

    fn route(
        &self,
        logits: &DeviceRows,
        top_k: usize,
        renormalize: bool,
        first_row: usize,
    ) -> Vec<Pick> {
        self.must(
            || format!("route {} × {} top-{top_k}", logits.rows, logits.cols),
            self.try_route(logits, top_k, renormalize, first_row),
        )
    }

    fn mix_rows(&self, out: &mut DeviceRows, y: &DeviceRows, picks: &[Pick]) {
        let rows: Vec<usize> = picks.iter().map(|p| p.row).collect();
        let weights: Vec<f32> = picks.iter().map(|p| p.weight).collect();
        let (n, cols) = (out.rows, out.cols);
        let done = self
            .gpu
            .mix_rows(&mut out.data, n, cols, &y.data, &rows, &weights);
        self.must(
            || format!("mix_rows: {} picks into {n} × {cols}", rows.len()),
            done,
        );
        out.quant = None;
    }

    fn add_gated(&self, out: &mut DeviceRows, y: &DeviceRows, gate: &DeviceRows) {
        let (rows, cols) = (out.rows, out.cols);
        let done = self
            .gpu
            .add_gated(&mut out.data, &y.data, &gate.data, rows, cols);
        self.must(|| format!("add_gated {rows} × {cols}"), done);
        out.quant = None;
    }

    fn zeros(&self, rows: usize, cols: usize) -> DeviceRows {
        self.act(
            self.must(
                || format!("zeros {rows} × {cols}"),
                self.gpu.zeros(rows * cols, "activations"),
            ),
            rows,
            cols,
        )
    }

    /// One stream: tasks run one after another (each already fills the device).
    fn run_tasks<T: Send, R: Send>(
        &self,
        _kind: Tasks,
        tasks: Vec<T>,
        _cost: impl Fn(&T) -> usize,
        task: impl Fn(T) -> R + Sync,
    ) -> Vec<R> {
        tasks.into_iter().map(task).collect()
    }

    fn sequence_groups(
        &self,
        _sequences: usize,
        _decoding: bool,
        _layer_weight_bytes: usize,
    ) -> usize {
        1
    }
}
