//! The CUDA backend against the CPU (feature `cuda`). Every kernel is checked against a plain
//! reference on random and odd shapes (the W8A8 GEMM's int32 accumulators and its f32
//! epilogue bit for bit, the quantizer byte for byte, attention within 1e-3), and the whole
//! model on the GPU against the CPU int8 engine. Without a device each test prints SKIPPED.
//! The `bench_*` tests (ignored; tools/gpu-check.sh runs them) print JSON lines, no asserts.
#![cfg(feature = "cuda")]

#[path = "cuda/attention.rs"]
mod attention;
#[path = "cuda/bench.rs"]
mod bench;
#[path = "cuda/common.rs"]
mod common;
#[path = "cuda/kernels.rs"]
mod kernels;
#[path = "cuda/kv.rs"]
mod kv;
#[path = "cuda/model.rs"]
mod model;
#[path = "cuda/w4a8.rs"]
mod w4a8;
