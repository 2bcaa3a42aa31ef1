//! Safe wrappers around the kernels: each checks its shapes against the buffers, then
//! launches on the compute stream. Buffers a kernel writes are passed `&mut`.

use super::device::{driver_error, Gpu};
use super::params::{EmAttnParams, EmGemmParams, EmQuantParams, EmRouteParams};
use crate::backend::cpu::int8::{padded_k, MAX_K};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

/// Threads of the one-block-per-row kernels (`em::ROW_THREADS` in common.cuh).
const ROW_THREADS: u32 = 256;
/// Threads per block of the elementwise kernels.
const EW_THREADS: u32 = 256;
/// Largest head dimension the attention kernel holds (MAX_HEAD_DIM in attention.cu).
pub const MAX_HEAD_DIM: usize = 256;
/// Most experts the device router handles (a 64-bit set of chosen experts).
pub const MAX_ROUTED_EXPERTS: usize = 64;

/// Per-token int8 activations on the device: `rows × k_padded`, one scale a row.
pub struct QuantAct {
    pub q: CudaSlice<i8>,
    pub scales: CudaSlice<f32>,
    pub rows: usize,
    pub k: usize,
    pub k_padded: usize,
}

/// W8A8 weights on the device: `n × k_padded` int8 (zero padded), one scale a channel.
pub struct DeviceInt8 {
    pub n: usize,
    pub k: usize,
    pub k_padded: usize,
    pub data: CudaSlice<i8>,
    pub scales: CudaSlice<f32>,
}

/// W4A8 weights on the device in the CPU's tiled layout (`model::int4`): values, f16 scales
/// and, for an asymmetric matrix, zero points.
pub struct DeviceInt4 {
    pub n: usize,
    pub k: usize,
    pub k_padded: usize,
    pub group: usize,
    pub data: CudaSlice<u8>,
    pub scales: CudaSlice<u16>,
    pub zeros: Option<CudaSlice<u8>>,
}

/// Which W8A8 kernel runs a product (`Auto` picks by M; tests force each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    Auto,
    /// dp4a GEMV, M ≤ 8.
    Gemv,
    /// mma.sync, 32 × 128 tiles.
    Small,
    /// mma.sync, 128 × 128 tiles.
    Large,
}

/// Output element type of a W8A8 product (`EmOutType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
}

/// Activation functions, numbered as elementwise.cu's `activate` does.
pub fn activation_id(act: crate::model::config::Activation) -> i32 {
    use crate::model::config::Activation::*;
    match act {
        Silu => 0,
        Relu => 1,
        Gelu => 2,
        GeluTanh => 3,
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.max(1) as u32).div_ceil(EW_THREADS), 1, 1),
        block_dim: (EW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn rows_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::Cuda(what()))
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda(format!("{what} = {v} is too large for the kernels")))
}

impl Gpu {
    fn launched(
        &self,
        name: &str,
        r: std::result::Result<(), cudarc::driver::DriverError>,
    ) -> Result<()> {
        r.map_err(|e| driver_error(&format!("launching {name}"), e))
    }

    /// Per-token quantization of `x` (`rows × cols`), after an RMS norm when `norm` is given
    /// (whose output is written to `normed`), with an optional per-column `inv_smooth`.
    pub fn quantize(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        norm: Option<(&CudaSlice<f32>, f32, &mut CudaSlice<f32>)>,
        inv_smooth: Option<&CudaSlice<f32>>,
    ) -> Result<QuantAct> {
        check(cols <= MAX_K && x.len() >= rows * cols, || {
            format!(
                "quantize: {rows} × {cols} does not fit the input of {} values",
                x.len()
            )
        })?;
        let k_padded = padded_k(cols);
        let mut q = self.zeros::<i8>(rows * k_padded, "quantized activations")?;
        let mut scales = self.zeros::<f32>(rows, "activation scales")?;
        if rows == 0 {
            return Ok(QuantAct {
                q,
                scales,
                rows,
                k: cols,
                k_padded,
            });
        }
        let (rms, eps) = (norm.is_some() as i32, norm.as_ref().map_or(0.0, |n| n.1));
        let p = EmQuantParams {
            rows: i32_of(rows, "rows")?,
            cols: i32_of(cols, "cols")?,
            k_padded: k_padded as i32,
            rms_norm: rms,
            eps,
            has_smooth: inv_smooth.is_some() as i32,
            pad0: 0,
            pad1: 0,
        };
        let mut spare = None;
        let (w, normed) = match norm {
            Some((w, _, out)) => (w, out),
            None => (
                &self.none_f32,
                spare.insert(self.zeros::<f32>(1, "placeholder")?),
            ),
        };
        let smooth = inv_smooth.unwrap_or(&self.none_f32);
        let mut b = self.stream.launch_builder(self.func("quantize_rows"));
        b.arg(&p)
            .arg(x)
            .arg(w)
            .arg(smooth)
            .arg(normed)
            .arg(&mut q)
            .arg(&mut scales);
        // SAFETY: the kernel reads rows × cols of x (checked), cols of w and smooth when
        // flagged, and writes rows × cols normed, rows × k_padded q and rows scales (sized).
        self.launched(
            "quantize_rows",
            unsafe { b.launch(rows_grid(rows)) }.map(|_| ()),
        )?;
        Ok(QuantAct {
            q,
            scales,
            rows,
            k: cols,
            k_padded,
        })
    }

    /// `out = x·Wᵀ` W8A8 into `out` (`m × n` of `out_type`), `+ bias` when given; the raw int32
    /// accumulators into `acc` when given (`m × n`).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_w8a8<T>(
        &self,
        kernel: GemmKernel,
        x: &QuantAct,
        w: &DeviceInt8,
        bias: Option<&CudaSlice<f32>>,
        out_type: OutType,
        out: &mut CudaSlice<T>,
        acc: Option<&mut CudaSlice<i32>>,
    ) -> Result<()> {
        let (m, n) = (x.rows, w.n);
        check(x.k == w.k && x.k_padded == w.k_padded, || {
            format!("gemm: activations have k = {}, weights k = {}", x.k, w.k)
        })?;
        check(
            out.len() >= m * n && bias.is_none_or(|b| b.len() >= n),
            || format!("gemm: output of {} for {m} × {n}", out.len()),
        )?;
        let kernel = match kernel {
            GemmKernel::Auto if m <= 8 => GemmKernel::Gemv,
            GemmKernel::Auto if m <= 64 => GemmKernel::Small,
            GemmKernel::Auto => GemmKernel::Large,
            k => k,
        };
        check(kernel != GemmKernel::Gemv || m <= 8, || {
            format!("gemv: M = {m} > 8")
        })?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let p = EmGemmParams {
            m: i32_of(m, "m")?,
            n: i32_of(n, "n")?,
            k_padded: i32_of(w.k_padded, "k")?,
            ldc: n as i32,
            out_type: out_type as i32,
            write_acc: acc.is_some() as i32,
            has_bias: bias.is_some() as i32,
            pad0: 0,
        };
        let (name, cfg) = match kernel {
            GemmKernel::Gemv => ("gemv_w8a8", (n.div_ceil(8), 1, 256)),
            GemmKernel::Small => ("gemm_w8a8_small", (n.div_ceil(128), m.div_ceil(32), 128)),
            _ => ("gemm_w8a8_large", (n.div_ceil(128), m.div_ceil(128), 256)),
        };
        let cfg = LaunchConfig {
            grid_dim: (cfg.0 as u32, cfg.1 as u32, 1),
            block_dim: (cfg.2, 1, 1),
            shared_mem_bytes: 0,
        };
        let bias = bias.unwrap_or(&self.none_f32);
        let mut spare = None;
        let acc = match acc {
            Some(a) => {
                check(a.len() >= m * n, || {
                    "gemm: accumulator buffer too small".to_owned()
                })?;
                a
            }
            None => spare.insert(self.zeros::<i32>(1, "placeholder")?),
        };
        let mut b = self.stream.launch_builder(self.func(name));
        b.arg(&p)
            .arg(&x.q)
            .arg(&x.scales)
            .arg(&w.data)
            .arg(&w.scales)
            .arg(bias)
            .arg(out)
            .arg(acc);
        // SAFETY: shapes checked above: m × k_padded and n × k_padded int8, m and n scales,
        // n bias values when flagged, m × n outputs (and accumulators when flagged).
        self.launched(name, unsafe { b.launch(cfg) }.map(|_| ()))
    }

    /// `y = x·Wᵀ (+ bias)` W4A8 in f32, bitwise equal to the CPU's `int8::int4::gemm`.
    pub fn gemm_w4a8(
        &self,
        x: &QuantAct,
        w: &DeviceInt4,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        let (m, n) = (x.rows, w.n);
        check(
            x.k == w.k && x.k_padded == padded_k(x.k) && x.k_padded <= w.k_padded,
            || {
                format!(
                    "gemm_w4a8: activations have k = {}, weights k = {}",
                    x.k, w.k
                )
            },
        )?;
        let tiles = n.div_ceil(16);
        let meta = tiles * (w.k_padded / w.group.max(1)) * 16;
        check(
            w.data.len() >= tiles * w.k_padded * 8
                && w.scales.len() >= meta
                && w.zeros.as_ref().is_none_or(|z| z.len() >= meta)
                && bias.is_none_or(|b| b.len() >= n)
                && x.q.len() >= m * x.k_padded
                && x.scales.len() >= m,
            || format!("gemm_w4a8: buffers too small for {m} × {n} × {}", w.k),
        )?;
        let mut y = self.zeros::<f32>(m * n, "linear output")?;
        if m == 0 || n == 0 {
            return Ok(y);
        }
        let ints = [
            i32_of(m, "m")?,
            i32_of(n, "n")?,
            i32_of(x.k_padded, "k")?,
            i32_of(w.k_padded, "k")?,
            i32_of(w.group, "group")?,
            w.zeros.is_some() as i32,
            bias.is_some() as i32,
        ];
        let bias = bias.unwrap_or(&self.none_f32);
        let mut spare = None;
        let zeros = match &w.zeros {
            Some(z) => z,
            None => spare.insert(self.zeros::<u8>(1, "placeholder")?),
        };
        // 8 warps a block, one 16-row tile each; 8 tokens a block row.
        let cfg = LaunchConfig {
            grid_dim: (tiles.div_ceil(8) as u32, m.div_ceil(8) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("gemm_w4a8"));
        for v in &ints {
            b.arg(v);
        }
        b.arg(&x.q)
            .arg(&x.scales)
            .arg(&w.data)
            .arg(&w.scales)
            .arg(zeros)
            .arg(bias)
            .arg(&mut y);
        // SAFETY: every buffer was checked against the shapes the kernel reads; it writes
        // m × n outputs (allocated).
        self.launched("gemm_w4a8", unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(y)
    }

    /// `y = x·Wᵀ (+ bias)` in f32 (`x`: `m × k`, `w`: `n × k` rows).
    pub fn gemm_f32(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        k: usize,
        w: &CudaSlice<f32>,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
    ) -> Result<CudaSlice<f32>> {
        check(x.len() >= m * k && w.len() >= n * k, || {
            format!("gemm_f32: {m} × {k} · {n} × {k}")
        })?;
        let mut y = self.zeros::<f32>(m * n, "linear output")?;
        if m == 0 || n == 0 {
            return Ok(y);
        }
        let (mi, ni, ki) = (i32_of(m, "m")?, i32_of(n, "n")?, i32_of(k, "k")?);
        let has_bias = bias.is_some() as i32;
        let bias = bias.unwrap_or(&self.none_f32);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(64) as u32, m.div_ceil(64) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("gemm_f32"));
        b.arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(x)
            .arg(w)
            .arg(bias)
            .arg(&has_bias)
            .arg(&mut y);
        // SAFETY: m × k inputs, n × k weights (checked), m × n outputs (allocated).
        self.launched("gemm_f32", unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(y)
    }

    /// RMS norm (`bias` None) or layer norm of `rows × dim`.
    pub fn norm(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
        weight: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        eps: f32,
    ) -> Result<CudaSlice<f32>> {
        check(x.len() >= rows * dim && weight.len() >= dim, || {
            "norm: shape".to_owned()
        })?;
        let mut out = self.zeros::<f32>(rows * dim, "norm output")?;
        if rows == 0 {
            return Ok(out);
        }
        let (ri, di) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        let (name, launched) = match bias {
            None => {
                let mut b = self.stream.launch_builder(self.func("rms_norm"));
                b.arg(&ri)
                    .arg(&di)
                    .arg(&eps)
                    .arg(x)
                    .arg(weight)
                    .arg(&mut out);
                // SAFETY: rows × dim in and out, dim weights (checked).
                ("rms_norm", unsafe { b.launch(rows_grid(rows)) }.map(|_| ()))
            }
            Some(bias) => {
                let mut b = self.stream.launch_builder(self.func("layer_norm"));
                b.arg(&ri)
                    .arg(&di)
                    .arg(&eps)
                    .arg(x)
                    .arg(weight)
                    .arg(bias)
                    .arg(&mut out);
                // SAFETY: as for rms_norm, plus dim biases.
                (
                    "layer_norm",
                    unsafe { b.launch(rows_grid(rows)) }.map(|_| ()),
                )
            }
        };
        self.launched(name, launched)?;
        Ok(out)
    }

    /// Rotates each head of the `rows × cols` rows of `x` by rows `first_row..` of `cos_sin`
    /// (`half` (cos, sin) pairs a row, `table_rows` rows).
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
        half: usize,
        cos_sin: &CudaSlice<f32>,
        table_rows: usize,
        first_row: usize,
    ) -> Result<()> {
        check(
            half > 0
                && cols.is_multiple_of(2 * half)
                && first_row + rows <= table_rows
                && x.len() >= rows * cols,
            || {
                format!(
                    "rope: {rows} × {cols} with half {half}, rows {first_row}.. of {table_rows}"
                )
            },
        )?;
        let v = [
            i32_of(rows, "rows")?,
            cols as i32,
            half as i32,
            first_row as i32,
        ];
        let mut b = self.stream.launch_builder(self.func("rope"));
        b.arg(&v[0])
            .arg(&v[1])
            .arg(&v[2])
            .arg(&v[3])
            .arg(cos_sin)
            .arg(x);
        // SAFETY: rows × cols values, table rows first_row..first_row + rows (checked).
        self.launched(
            "rope",
            unsafe { b.launch(grid_1d(rows * cols / 2)) }.map(|_| ()),
        )
    }

    /// `x = act(x)` over `n` values.
    pub fn activate(&self, x: &mut CudaSlice<f32>, n: usize, act: i32) -> Result<()> {
        check(x.len() >= n, || "activate: shape".to_owned())?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(self.func("activate_inplace"));
        b.arg(&n64).arg(&act).arg(x);
        // SAFETY: n values (checked).
        self.launched("activate", unsafe { b.launch(grid_1d(n)) }.map(|_| ()))
    }

    /// `gate = act(gate) · up` over `n` values.
    pub fn gated_act(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        n: usize,
        act: i32,
    ) -> Result<()> {
        check(gate.len() >= n && up.len() >= n, || {
            "gated activation: shape".to_owned()
        })?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(self.func("gated_act"));
        b.arg(&n64).arg(&act).arg(gate).arg(up);
        // SAFETY: n values each (checked).
        self.launched("gated_act", unsafe { b.launch(grid_1d(n)) }.map(|_| ()))
    }

    /// `x += y` over `n` values.
    pub fn add(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> Result<()> {
        check(x.len() >= n && y.len() >= n, || "add: shape".to_owned())?;
        let n64 = n as i64;
        let mut b = self.stream.launch_builder(self.func("add_inplace"));
        b.arg(&n64).arg(x).arg(y);
        // SAFETY: n values each (checked).
        self.launched("add", unsafe { b.launch(grid_1d(n)) }.map(|_| ()))
    }

    /// `x ← H_b·x` on every run of `block` values of the first `n` (`block` a power of two,
    /// at most 4096, dividing `n`).
    pub fn hadamard(&self, x: &mut CudaSlice<f32>, n: usize, block: usize) -> Result<()> {
        check(
            block.is_power_of_two() && block <= 4096 && n.is_multiple_of(block) && x.len() >= n,
            || format!("hadamard: {n} values in runs of {block}"),
        )?;
        let cfg = LaunchConfig {
            grid_dim: ((n / block) as u32, 1, 1),
            block_dim: (block.clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: (block * 4) as u32,
        };
        let block32 = block as i32;
        let mut b = self.stream.launch_builder(self.func("hadamard_blocks"));
        b.arg(&block32).arg(x);
        // SAFETY: n / block runs of block values each (checked); the run fits in shared memory.
        self.launched("hadamard", unsafe { b.launch(cfg) }.map(|_| ()))
    }

    /// Every row of `width = m·block` values with its runs of `block` mixed position by position
    /// by the orthonormal DCT-II of size m (into a new buffer).
    pub fn mix_blocks(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        width: usize,
        block: usize,
    ) -> Result<CudaSlice<f32>> {
        let n = rows * width;
        check(
            block > 0 && width.is_multiple_of(block) && x.len() >= n,
            || format!("mix_blocks: rows of {width} in runs of {block}"),
        )?;
        let mut out = self.zeros::<f32>(n, "rotated rows")?;
        let (n64, w32, b32) = (n as i64, width as i32, block as i32);
        let mut b = self.stream.launch_builder(self.func("mix_blocks"));
        b.arg(&n64).arg(&w32).arg(&b32).arg(x).arg(&mut out);
        // SAFETY: n values in and out (checked, allocated).
        self.launched("mix_blocks", unsafe { b.launch(grid_1d(n)) }.map(|_| ()))?;
        Ok(out)
    }

    /// `out[r] = table[index[r]]` (`dim` floats a row, `table_rows` rows; indices checked on
    /// the host first).
    pub fn gather_rows(
        &self,
        table: &CudaSlice<f32>,
        table_rows: usize,
        dim: usize,
        index: &[usize],
    ) -> Result<CudaSlice<f32>> {
        let mut out = self.zeros::<f32>(index.len() * dim, "gathered rows")?;
        self.gather_rows_into(table, table_rows, dim, index, &mut out)?;
        Ok(out)
    }

    /// [`Self::gather_rows`] into the first `index.len()` rows of `out` (which may hold more).
    pub fn gather_rows_into(
        &self,
        table: &CudaSlice<f32>,
        table_rows: usize,
        dim: usize,
        index: &[usize],
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = index.len();
        check(
            index.iter().all(|&i| i < table_rows)
                && table.len() >= table_rows * dim
                && out.len() >= rows * dim,
            || {
                format!(
                    "gather: an index is outside the {table_rows} rows, or {rows} rows do not fit"
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let idx: Vec<i32> = index.iter().map(|&i| i as i32).collect();
        let idx = self.upload(&idx, "row indices")?;
        let (ri, di) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        let mut b = self.stream.launch_builder(self.func("gather_rows"));
        b.arg(&ri).arg(&di).arg(&idx).arg(table).arg(out);
        // SAFETY: indices < table_rows, rows × dim outputs fit (both checked).
        self.launched(
            "gather_rows",
            unsafe { b.launch(grid_1d(rows * dim)) }.map(|_| ()),
        )
    }

    /// `x[r] += table[index[r]]`.
    pub fn add_rows(
        &self,
        x: &mut CudaSlice<f32>,
        dim: usize,
        table: &CudaSlice<f32>,
        table_rows: usize,
        index: &[usize],
    ) -> Result<()> {
        let rows = index.len();
        check(
            index.iter().all(|&i| i < table_rows)
                && x.len() >= rows * dim
                && table.len() >= table_rows * dim,
            || "add_rows: an index is outside the table".to_owned(),
        )?;
        if rows == 0 {
            return Ok(());
        }
        let idx: Vec<i32> = index.iter().map(|&i| i as i32).collect();
        let idx = self.upload(&idx, "row indices")?;
        let (ri, di) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        let mut b = self.stream.launch_builder(self.func("add_rows"));
        b.arg(&ri).arg(&di).arg(&idx).arg(table).arg(x);
        // SAFETY: as for gather_rows.
        self.launched(
            "add_rows",
            unsafe { b.launch(grid_1d(rows * dim)) }.map(|_| ()),
        )
    }

    /// `out[rows[i]] += weights[i] · y[i]` (rows distinct, each `< out_rows`).
    pub fn mix_rows(
        &self,
        out: &mut CudaSlice<f32>,
        out_rows: usize,
        dim: usize,
        y: &CudaSlice<f32>,
        rows: &[usize],
        weights: &[f32],
    ) -> Result<()> {
        let n = rows.len();
        check(
            weights.len() == n
                && rows.iter().all(|&r| r < out_rows)
                && y.len() >= n * dim
                && out.len() >= out_rows * dim,
            || "mix_rows: shape".to_owned(),
        )?;
        if n == 0 {
            return Ok(());
        }
        let idx: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
        let idx = self.upload(&idx, "pick rows")?;
        let w = self.upload(weights, "pick weights")?;
        let (ni, di) = (i32_of(n, "picks")?, i32_of(dim, "dim")?);
        let mut b = self.stream.launch_builder(self.func("mix_rows"));
        b.arg(&ni).arg(&di).arg(&idx).arg(&w).arg(y).arg(out);
        // SAFETY: rows < out_rows, n × dim of y (checked).
        self.launched(
            "mix_rows",
            unsafe { b.launch(grid_1d(n * dim)) }.map(|_| ()),
        )
    }

    /// `out[r] += sigmoid(gate[r]) · y[r]`.
    pub fn add_gated(
        &self,
        out: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        gate: &CudaSlice<f32>,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        check(
            out.len() >= rows * dim && y.len() >= rows * dim && gate.len() >= rows,
            || "add_gated: shape".to_owned(),
        )?;
        if rows == 0 {
            return Ok(());
        }
        let (ri, di) = (i32_of(rows, "rows")?, i32_of(dim, "dim")?);
        let mut b = self.stream.launch_builder(self.func("add_gated"));
        b.arg(&ri).arg(&di).arg(gate).arg(y).arg(out);
        // SAFETY: rows × dim values, rows gates (checked).
        self.launched(
            "add_gated",
            unsafe { b.launch(grid_1d(rows * dim)) }.map(|_| ()),
        )
    }

    /// `x · s[col]` into a new buffer.
    pub fn scale_cols(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        s: &CudaSlice<f32>,
    ) -> Result<CudaSlice<f32>> {
        check(x.len() >= rows * cols && s.len() >= cols, || {
            "scale_cols: shape".to_owned()
        })?;
        let mut out = self.zeros::<f32>(rows * cols, "scaled input")?;
        let (ri, ci) = (i32_of(rows, "rows")?, i32_of(cols, "cols")?);
        let mut b = self.stream.launch_builder(self.func("scale_cols"));
        b.arg(&ri).arg(&ci).arg(s).arg(x).arg(&mut out);
        // SAFETY: rows × cols values, cols scales (checked).
        self.launched(
            "scale_cols",
            unsafe { b.launch(grid_1d(rows * cols)) }.map(|_| ()),
        )?;
        Ok(out)
    }

    /// Softmax + top-k of `rows × experts` logits: (experts, weights), `rows × top_k` each.
    pub fn route(
        &self,
        logits: &CudaSlice<f32>,
        rows: usize,
        experts: usize,
        top_k: usize,
        renormalize: bool,
    ) -> Result<(CudaSlice<i32>, CudaSlice<f32>)> {
        check(
            experts <= MAX_ROUTED_EXPERTS
                && top_k >= 1
                && top_k <= experts
                && logits.len() >= rows * experts,
            || {
                format!("route: {experts} experts top-{top_k} (the device router takes at most {MAX_ROUTED_EXPERTS})")
            },
        )?;
        let mut ids = self.zeros::<i32>(rows * top_k, "routed experts")?;
        let mut ws = self.zeros::<f32>(rows * top_k, "routing weights")?;
        if rows == 0 {
            return Ok((ids, ws));
        }
        let p = EmRouteParams {
            rows: i32_of(rows, "rows")?,
            experts: experts as i32,
            top_k: top_k as i32,
            renormalize: renormalize as i32,
        };
        let mut b = self.stream.launch_builder(self.func("route_topk"));
        b.arg(&p).arg(logits).arg(&mut ids).arg(&mut ws);
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(128), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: rows × experts logits (checked), rows × top_k outputs (allocated).
        self.launched("route_topk", unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok((ids, ws))
    }

    /// Stable sort of picks by expert: (offsets, `experts + 1`; order, one pick index each).
    pub fn moe_sort(
        &self,
        expert_of: &CudaSlice<i32>,
        n: usize,
        experts: usize,
    ) -> Result<(CudaSlice<i32>, CudaSlice<i32>)> {
        check(
            (1..=1024).contains(&experts) && expert_of.len() >= n,
            || format!("moe_sort: {experts} experts"),
        )?;
        let mut offsets = self.zeros::<i32>(experts + 1, "expert offsets")?;
        let mut order = self.zeros::<i32>(n, "pick order")?;
        let (ni, ei) = (i32_of(n, "picks")?, experts as i32);
        let mut b = self.stream.launch_builder(self.func("moe_sort"));
        b.arg(&ni)
            .arg(&ei)
            .arg(expert_of)
            .arg(&mut offsets)
            .arg(&mut order);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: ((experts as u32).next_multiple_of(32), 1, 1),
            shared_mem_bytes: 4 * experts as u32,
        };
        // SAFETY: n expert ids (checked; values outside 0..experts are simply not counted),
        // experts + 1 offsets and n order slots (allocated), shared memory for the counts.
        self.launched("moe_sort", unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok((offsets, order))
    }

    /// Grouped W8A8: rows `offsets[e]..offsets[e+1]` of `x` (sorted by expert) times expert
    /// `e`'s weights, for every expert in one launch; f32 `x.rows × n` out (no bias).
    pub fn gemm_grouped(
        &self,
        x: &QuantAct,
        weights: &[&DeviceInt8],
        offsets: &CudaSlice<i32>,
        host_offsets: &[usize],
        acc: Option<&mut CudaSlice<i32>>,
    ) -> Result<CudaSlice<f32>> {
        let e = weights.len();
        let n = weights.first().map_or(0, |w| w.n);
        check(
            e > 0
                && host_offsets.len() == e + 1
                && host_offsets[e] == x.rows
                && weights
                    .iter()
                    .all(|w| w.n == n && w.k == x.k && w.k_padded == x.k_padded),
            || "grouped gemm: experts disagree in shape".to_owned(),
        )?;
        let mut out = self.zeros::<f32>(x.rows * n, "grouped expert output")?;
        let most = host_offsets
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0);
        if most == 0 || n == 0 {
            return Ok(out);
        }
        let wp: Vec<u64> = weights
            .iter()
            .map(|w| super::device::address(&w.data, &self.stream))
            .collect();
        let sp: Vec<u64> = weights
            .iter()
            .map(|w| super::device::address(&w.scales, &self.stream))
            .collect();
        let (wp, sp) = (
            self.upload(&wp, "expert weight table")?,
            self.upload(&sp, "expert scale table")?,
        );
        let p = EmGemmParams {
            m: i32_of(x.rows, "rows")?,
            n: i32_of(n, "n")?,
            k_padded: i32_of(x.k_padded, "k")?,
            ldc: n as i32,
            out_type: 0,
            write_acc: acc.is_some() as i32,
            has_bias: 0,
            pad0: 0,
        };
        let mut spare = None;
        let acc = match acc {
            Some(a) => a,
            None => spare.insert(self.zeros::<i32>(1, "placeholder")?),
        };
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(128) as u32, most.div_ceil(32) as u32, e as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(self.func("gemm_w8a8_grouped"));
        b.arg(&p)
            .arg(&x.q)
            .arg(&x.scales)
            .arg(&wp)
            .arg(&sp)
            .arg(offsets)
            .arg(&mut out)
            .arg(acc);
        // SAFETY: the device offsets must equal host_offsets (the caller's contract: the same
        // values, one uploaded): every expert's rows lie inside x, its weights are n × k_padded.
        self.launched("gemm_w8a8_grouped", unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(out)
    }

    /// nvcc's sizes and offsets of the params.h structs (`params_layout`).
    pub fn params_layout(&self) -> Result<Vec<i32>> {
        let mut out = self.zeros::<i32>(64, "layout probe")?;
        let mut b = self.stream.launch_builder(self.func("params_layout"));
        b.arg(&mut out);
        // SAFETY: the probe writes fewer than 64 ints.
        self.launched(
            "params_layout",
            unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.map(|_| ()),
        )?;
        self.download(&out, 64, "layout probe")
    }
}

/// The inputs of one attention call over one sequence's slots.
pub struct AttnInputs<'a> {
    pub q: CudaView<'a, f32>,
    pub q_positions: &'a [usize],
    pub keys: &'a CudaSlice<f32>,
    pub values: &'a CudaSlice<f32>,
    pub slot_positions: &'a CudaSlice<i32>,
    pub valid: &'a CudaSlice<u8>,
    pub slots: usize,
}

/// Geometry of an attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// 0: no window.
    pub window: usize,
    /// Slots per split (0: chosen from the device's size).
    pub split_len: usize,
}

impl Gpu {
    /// Split-KV attention into `out` (`q rows × heads·head_dim`); adds each slot's attention
    /// mass to `mass` when given.
    pub fn attention(
        &self,
        shape: AttnShape,
        inp: &AttnInputs,
        out: &mut CudaViewMut<f32>,
        mass: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        let (h, kvh, d) = (shape.num_heads, shape.num_kv_heads, shape.head_dim);
        let rows = inp.q_positions.len();
        check(
            d > 0
                && d <= MAX_HEAD_DIM
                && kvh > 0
                && h % kvh == 0
                && inp.q.len() >= rows * h * d
                && out.len() >= rows * h * d
                && inp.keys.len() >= inp.slots * kvh * d
                && inp.values.len() >= inp.slots * kvh * d
                && inp.slot_positions.len() >= inp.slots
                && inp.valid.len() >= inp.slots
                && mass.as_ref().is_none_or(|m| m.len() >= inp.slots),
            || {
                format!(
                    "attention: {rows} rows, {h} heads over {kvh}, head_dim {d}, {} slots",
                    inp.slots
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let slots = inp.slots.max(1);
        let split_len = if shape.split_len > 0 {
            shape.split_len
        } else {
            // Enough blocks to fill the device twice over, but splits of at least 64 slots.
            let want = (2 * self.sms).div_ceil(rows * h).max(1);
            slots.div_ceil(want).max(64)
        };
        let splits = slots.div_ceil(split_len);
        let p = EmAttnParams {
            q_rows: i32_of(rows, "rows")?,
            num_heads: h as i32,
            num_kv_heads: kvh as i32,
            head_dim: d as i32,
            slots: i32_of(inp.slots, "slots")?,
            split_len: i32_of(split_len, "split")?,
            splits: splits as i32,
            window: i32_of(shape.window, "window")?,
            scale: 1.0 / (d as f32).sqrt(),
            want_mass: mass.is_some() as i32,
            pad0: 0,
            pad1: 0,
        };
        let qpos: Vec<i32> = inp.q_positions.iter().map(|&p| p as i32).collect();
        let qpos = self.upload(&qpos, "query positions")?;
        let mut part_ml = self.zeros::<f32>(rows * h * splits * 2, "attention partial sums")?;
        let mut part_acc = self.zeros::<f32>(rows * h * splits * d, "attention partial values")?;
        let scores_len = if mass.is_some() {
            rows * h * inp.slots
        } else {
            1
        };
        let mut scores = self.zeros::<f32>(scores_len, "attention scores")?;
        let mut b = self.stream.launch_builder(self.func("attention_split"));
        b.arg(&p)
            .arg(&inp.q)
            .arg(&qpos)
            .arg(inp.keys)
            .arg(inp.values)
            .arg(inp.slot_positions)
            .arg(inp.valid)
            .arg(&mut part_ml)
            .arg(&mut part_acc)
            .arg(&mut scores);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, h as u32, splits as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every extent checked above; partials and scores sized for the grid.
        self.launched("attention_split", unsafe { b.launch(cfg) }.map(|_| ()))?;
        let mut final_ml = self.zeros::<f32>(rows * h * 2, "attention totals")?;
        let mut b = self.stream.launch_builder(self.func("attention_merge"));
        b.arg(&p)
            .arg(&part_ml)
            .arg(&part_acc)
            .arg(out)
            .arg(&mut final_ml);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, h as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: partials as written above; rows × h × d outputs (checked).
        self.launched("attention_merge", unsafe { b.launch(cfg) }.map(|_| ()))?;
        if let Some(mass) = mass {
            let mut b = self.stream.launch_builder(self.func("attention_mass"));
            b.arg(&p).arg(&scores).arg(&final_ml).arg(mass);
            // SAFETY: rows × h × slots scores, rows × h totals, slots masses (checked).
            self.launched(
                "attention_mass",
                unsafe { b.launch(grid_1d(inp.slots)) }.map(|_| ()),
            )?;
        }
        Ok(())
    }
}
