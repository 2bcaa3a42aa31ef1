//! The device: context, the one compute stream, the kernels loaded from the embedded fatbins,
//! and memory that fails with a clear error naming what was being allocated and how much.

use crate::error::{Error, Result};
use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::Arc;

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Every kernel the backend launches, by module (kernels/NAME.cu).
const KERNELS: &[(&str, &[&str])] = &[
    (
        "gemm_w8a8",
        &[
            "gemm_w8a8_large",
            "gemm_w8a8_small",
            "gemv_w8a8",
            "gemm_f32",
            "gemm_w8a8_grouped",
        ],
    ),
    ("gemm_w4a8", &["gemm_w4a8"]),
    ("quantize", &["quantize_rows"]),
    ("route", &["route_topk", "moe_sort"]),
    (
        "elementwise",
        &[
            "rms_norm",
            "layer_norm",
            "rope",
            "activate_inplace",
            "gated_act",
            "add_inplace",
            "hadamard_blocks",
            "mix_blocks",
            "gather_rows",
            "add_rows",
            "mix_rows",
            "add_gated",
            "scale_cols",
            "params_layout",
        ],
    ),
    (
        "attention",
        &["attention_split", "attention_merge", "attention_mass"],
    ),
];

/// One GPU with the backend's kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// The device's name, as the driver reports it.
    pub name: String,
    /// Streaming multiprocessors (sizes split-KV grids).
    pub sms: usize,
    /// Stand-ins for the optional buffers a kernel is told (by a flag) not to read.
    pub none_f32: CudaSlice<f32>,
    pub none_i32: CudaSlice<i32>,
}

/// A driver error as one line naming what failed.
pub fn driver_error(what: &str, e: DriverError) -> Error {
    Error::Cuda(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens device `ordinal`, or says in one line why no GPU can be used. Probes for the
    /// driver library first: cudarc panics on first use where none exists.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only tries to dlopen libcuda; nothing is called through it.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver (libcuda) on this machine".to_owned(),
            ));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| driver_error(&format!("cannot open CUDA device {ordinal}"), e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_owned());
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize);
        let stream = ctx.default_stream();
        let mut functions = HashMap::new();
        for &(module, names) in KERNELS {
            let image = fatbins::MODULES
                .iter()
                .find(|m| m.0 == module)
                .map(|m| m.1)
                .ok_or_else(|| Error::Cuda(format!("kernel module {module} was not built")))?;
            let loaded = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(image.to_vec()))
                .map_err(|e| driver_error(&format!("cannot load kernels/{module}.cu"), e))?;
            for &f in names {
                let func = loaded
                    .load_function(f)
                    .map_err(|e| driver_error(&format!("kernel {f} in {module}.cu"), e))?;
                functions.insert(f, func);
            }
        }
        let none_f32 = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| driver_error("allocating a placeholder buffer", e))?;
        let none_i32 = stream
            .alloc_zeros::<i32>(1)
            .map_err(|e| driver_error("allocating a placeholder buffer", e))?;
        Ok(Gpu {
            ctx,
            stream,
            functions,
            name,
            sms,
            none_f32,
            none_i32,
        })
    }

    /// A loaded kernel by name.
    pub fn func(&self, name: &str) -> &CudaFunction {
        // Every name the wrappers use is in KERNELS, all loaded by `open`.
        match self.functions.get(name) {
            Some(f) => f,
            None => panic!("kernel {name} is not in the backend's kernel list"),
        }
    }

    /// `len` zeroed elements of device memory for `what`.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        len: usize,
        what: &str,
    ) -> Result<CudaSlice<T>> {
        // Zero-length allocations are not allowed by the driver: round up to one element.
        self.stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| self.alloc_error(e, len * std::mem::size_of::<T>(), what))
    }

    /// A device copy of `data` for `what`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T], what: &str) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            // SAFETY: a one-element buffer that nothing reads (empty tensors are never
            // indexed); cudarc's `alloc` is unsafe only because the memory is uninitialized.
            return unsafe { self.stream.alloc::<T>(1) }
                .map_err(|e| self.alloc_error(e, std::mem::size_of::<T>(), what));
        }
        self.stream
            .clone_htod(data)
            .map_err(|e| self.alloc_error(e, std::mem::size_of_val(data), what))
    }

    /// The first `len` elements of `src`, on the host.
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        src: &CudaSlice<T>,
        len: usize,
        what: &str,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len > 0 {
            self.stream
                .memcpy_dtoh(&src.slice(0..len), out.as_mut_slice())
                .map_err(|e| driver_error(&format!("copying {what} to the host"), e))?;
        }
        Ok(out)
    }

    /// Waits for everything queued on the stream (errors of earlier launches surface here).
    pub fn sync(&self, what: &str) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error(&format!("{what} failed on the device"), e))
    }

    fn alloc_error(&self, e: DriverError, bytes: usize, what: &str) -> Error {
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
            Error::OutOfMemory(format!(
                "the GPU ({}) cannot allocate {bytes} bytes for {what}: {free} of {total} bytes free",
                self.name
            ))
        } else {
            driver_error(&format!("allocating {bytes} bytes for {what}"), e)
        }
    }
}

/// The device address of a buffer (for tables of per-expert pointers).
pub fn address<T>(buf: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (ptr, _sync) = buf.device_ptr(stream);
    ptr
}
