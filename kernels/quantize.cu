// Per-token activation quantization, optionally fused with the RMS norm before it, exactly as
// the CPU engine quantizes (src/backend/cpu/int8): scale = max|x| / 127 (IEEE division),
// q = round-half-away(x / scale) clamped to [-127, 127]; an all-zero row gets scale 1, a row
// holding inf/NaN scale NaN, both with zeros; the row is zero padded to k_padded.
#include "common.cuh"

namespace {

// |v| as bits: for non-negative floats integer order is float order with NaN above inf, so an
// integer max finds max|x| and lets NaN win, as on the CPU.
__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

__device__ __forceinline__ float value_at(const EmQuantParams& p, const float* xr,
                                          const float* norm_w, float r, const float* inv_smooth,
                                          int j) {
    // The norm rounds as the CPU's does: w * (v * r).
    float v = p.rms_norm ? __fmul_rn(norm_w[j], __fmul_rn(xr[j], r)) : xr[j];
    return p.has_smooth ? __fmul_rn(v, inv_smooth[j]) : v;
}

}  // namespace

// One block of ROW_THREADS threads per row. normed (rows x cols) receives the normalized row
// when rms_norm is set (the residual stream's other readers need it in f32).
extern "C" __global__ void __launch_bounds__(em::ROW_THREADS)
    quantize_rows(EmQuantParams p, const float* __restrict__ x, const float* __restrict__ norm_w,
                  const float* __restrict__ inv_smooth, float* __restrict__ normed,
                  int8_t* __restrict__ q, float* __restrict__ scales) {
    __shared__ float fscratch[em::ROW_THREADS / 32];
    __shared__ unsigned uscratch[em::ROW_THREADS / 32];
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const float* xr = x + (size_t)row * p.cols;
    int8_t* qr = q + (size_t)row * p.k_padded;

    float r = 1.f;
    if (p.rms_norm) {
        float ss = 0.f;
        for (int j = threadIdx.x; j < p.cols; j += em::ROW_THREADS) ss += xr[j] * xr[j];
        const float ms = em::block_sum(ss, fscratch) / (float)p.cols;
        r = 1.f / sqrtf(ms + p.eps);
    }
    unsigned max_bits = 0;
    for (int j = threadIdx.x; j < p.cols; j += em::ROW_THREADS) {
        const float v = value_at(p, xr, norm_w, r, inv_smooth, j);
        if (p.rms_norm) normed[(size_t)row * p.cols + j] = v;
        max_bits = max(max_bits, abs_bits(v));
    }
    max_bits = em::block_max_u32(max_bits, uscratch);
    const float max_abs = __uint_as_float(max_bits);
    float scale = max_abs / 127.f;
    bool zeros = false;
    if (!isfinite(max_abs)) {
        scale = __int_as_float(0x7fc00000);
        zeros = true;
    } else if (scale == 0.f) {
        scale = 1.f;
        zeros = true;
    }
    for (int j = threadIdx.x; j < p.k_padded; j += em::ROW_THREADS) {
        int8_t out = 0;
        if (!zeros && j < p.cols) {
            const float v = value_at(p, xr, norm_w, r, inv_smooth, j);
            out = (int8_t)fminf(fmaxf(roundf(v / scale), -127.f), 127.f);
        }
        qr[j] = out;
    }
    if (threadIdx.x == 0) scales[row] = scale;
}
