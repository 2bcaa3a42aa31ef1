//! The structs of kernels/params.h, as bindgen generated them from that one header (its layout
//! assertions compare Rust's layout with clang's; tests/cuda.rs compares it with nvcc's).

#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/params.rs"));

// SAFETY: plain `#[repr(C)]` structs of ints and floats, laid out as the kernels' copy of
// params.h (the same file), so passing them by value to a kernel is a byte copy.
unsafe impl cudarc::driver::DeviceRepr for EmGemmParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EmQuantParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EmAttnParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for EmRouteParams {}
