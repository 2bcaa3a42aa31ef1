//! The CUDA backend (feature `cuda`): hand-written kernels (kernels/*.cu, compiled by build.rs
//! into fatbins embedded in the binary) driven through cudarc on one compute stream, with the
//! whole model resident on the device. libcuda is loaded at run time: where there is none,
//! [`CudaBackend::new`] fails with one line and the caller runs on the CPU.

pub mod backend;
pub mod copier;
pub mod device;
pub mod kernels;
pub mod kv;
pub mod params;
pub mod weights;

pub use backend::{CudaBackend, DeviceRows};
pub use device::Gpu;
