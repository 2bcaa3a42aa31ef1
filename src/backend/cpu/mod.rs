//! The CPU backend: f32 kernels (AVX2+FMA or scalar, chosen at run time).

pub mod attention;
pub mod backend;
pub mod evict;
pub mod half;
pub mod int8;
pub mod int8w;
pub mod matmul;
pub mod ops;
pub mod packed;
pub mod parallel;
pub mod routing;
pub mod simd;
pub mod vexp;

pub use backend::{CpuBackend, Rows};
