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

/// The kernel tier each CPU kernel family runs on this machine, after the environment's caps
/// (`EDGEMOE_CPU`, `EDGEMOE_INT8_TIER`, `EDGEMOE_HALF_TIER`): what a benchmark measured.
pub fn kernel_tiers() -> serde_json::Value {
    let f32_tier = if simd::cpu_features().avx2_fma {
        "avx2"
    } else {
        "scalar"
    };
    serde_json::json!({
        "f32": f32_tier,
        "int8": int8::active_tier().name(),
        "int4": int8::int4::int4_tier(int8::active_tier()).name(),
        "half": half::active_tier().name(),
        "int8_head": half::active_tier().name(),
    })
}
