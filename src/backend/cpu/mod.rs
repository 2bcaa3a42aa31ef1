//! The CPU backend: f32 kernels (AVX2+FMA or scalar, chosen at run time).

pub(crate) mod attention;
pub(crate) mod backend;
pub(crate) mod evict;
pub mod half;
pub mod int8;
pub mod int8w;
pub mod kv;
pub mod matmul;
pub mod ops;
pub mod packed;
pub(crate) mod parallel;
pub mod prepare;
pub mod routing;
pub(crate) mod simd;
pub(crate) mod vexp;

pub use backend::{CpuBackend, Rows};
pub use kv::HostKv;
