// Device helpers shared by the kernel files.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "params.h"

namespace em {

// Threads of the one-block-per-row kernels (norms, quantization, router).
constexpr int ROW_THREADS = 256;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_sum_i32(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of `v` over a block of ROW_THREADS threads; every thread gets the result.
// `scratch` holds ROW_THREADS / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    // Every thread adds the warps' partial sums in the same order: one result for all.
    for (int w = 0; w < ROW_THREADS / 32; ++w) total += scratch[w];
    return total;
}

__device__ __forceinline__ unsigned block_max_u32(unsigned v, unsigned* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max_u32(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    unsigned m = 0;
    for (int w = 0; w < ROW_THREADS / 32; ++w) m = max(m, scratch[w]);
    return m;
}

// The GEMM epilogue, rounded step by step as the CPU engine does (no FMA):
// ((float)acc * s_tok) * s_chan (+ bias).
__device__ __forceinline__ float w8a8_epilogue(int acc, float s_tok, float s_chan,
                                               const float* bias, int has_bias, int col) {
    float v = __fmul_rn(__fmul_rn(__int2float_rn(acc), s_tok), s_chan);
    return has_bias ? __fadd_rn(v, bias[col]) : v;
}

__device__ __forceinline__ void store_typed(void* out, size_t idx, int out_type, float v) {
    switch (out_type) {
        case EM_OUT_F16: static_cast<__half*>(out)[idx] = __float2half_rn(v); break;
        case EM_OUT_BF16: static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(v); break;
        default: static_cast<float*>(out)[idx] = v; break;
    }
}

// Writes output (r, c) of a W8A8 product (and its raw accumulator when asked).
__device__ __forceinline__ void w8a8_store(const EmGemmParams& p, void* out, int* acc_out,
                                           const float* sa, const float* sb, const float* bias,
                                           int r, int c, int acc) {
    if (r >= p.m || c >= p.n) return;
    if (p.write_acc) acc_out[(size_t)r * p.n + c] = acc;
    store_typed(out, (size_t)r * p.ldc + c, p.out_type,
                w8a8_epilogue(acc, sa[r], sb[c], bias, p.has_bias, c));
}

}  // namespace em
