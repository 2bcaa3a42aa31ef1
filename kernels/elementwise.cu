// The small ops of the forward pass: norms, RoPE, activations, residual add, embedding
// gather, row gather/mix, and a probe of params.h's layout as nvcc sees it.
#include <stddef.h>

#include "common.cuh"

namespace {

// Activation ids, as src/backend/cuda/ops.rs numbers them.
enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3 };

__device__ __forceinline__ float activate(int act, float v) {
    switch (act) {
        case ACT_RELU: return fmaxf(v, 0.f);
        case ACT_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
        case ACT_GELU_TANH: {
            const float c = 0.7978845608028654f;
            return 0.5f * v * (1.f + tanhf(c * (v + 0.044715f * v * v * v)));
        }
        default: return v / (1.f + expf(-v));
    }
}

}  // namespace

// One block of ROW_THREADS per row: out = w * (x * r), r = 1 / sqrt(mean(x^2) + eps).
extern "C" __global__ void __launch_bounds__(em::ROW_THREADS)
    rms_norm(int rows, int dim, float eps, const float* __restrict__ x,
             const float* __restrict__ w, float* __restrict__ out) {
    __shared__ float scratch[em::ROW_THREADS / 32];
    const int row = blockIdx.x;
    const float* xr = x + (size_t)row * dim;
    float ss = 0.f;
    for (int j = threadIdx.x; j < dim; j += em::ROW_THREADS) ss += xr[j] * xr[j];
    const float r = 1.f / sqrtf(em::block_sum(ss, scratch) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += em::ROW_THREADS)
        out[(size_t)row * dim + j] = __fmul_rn(w[j], __fmul_rn(xr[j], r));
}

// out = (x - mean) * r * w + b, r = 1 / sqrt(var + eps).
extern "C" __global__ void __launch_bounds__(em::ROW_THREADS)
    layer_norm(int rows, int dim, float eps, const float* __restrict__ x,
               const float* __restrict__ w, const float* __restrict__ b,
               float* __restrict__ out) {
    __shared__ float scratch[em::ROW_THREADS / 32];
    const int row = blockIdx.x;
    const float* xr = x + (size_t)row * dim;
    float s = 0.f;
    for (int j = threadIdx.x; j < dim; j += em::ROW_THREADS) s += xr[j];
    const float mean = em::block_sum(s, scratch) / (float)dim;
    float v = 0.f;
    for (int j = threadIdx.x; j < dim; j += em::ROW_THREADS) v += (xr[j] - mean) * (xr[j] - mean);
    const float r = 1.f / sqrtf(em::block_sum(v, scratch) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += em::ROW_THREADS)
        out[(size_t)row * dim + j] = (xr[j] - mean) * r * w[j] + b[j];
}

// Rotates every head (2 * half values: first half x0, second half x1) of row r of x by row
// first_row + r of cos_sin (pairs (cos, sin), half of them a row), rounding as the CPU does.
extern "C" __global__ void rope(int rows, int cols, int half, int first_row,
                                const float* __restrict__ cos_sin, float* __restrict__ x) {
    const int pairs = cols / 2;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * pairs) return;
    const int r = (int)(i / pairs), pr = (int)(i % pairs);
    const int head = pr / half, f = pr % half;
    float* h = x + (size_t)r * cols + (size_t)head * 2 * half;
    const float c = cos_sin[((size_t)(first_row + r) * half + f) * 2];
    const float s = cos_sin[((size_t)(first_row + r) * half + f) * 2 + 1];
    const float x0 = h[f], x1 = h[f + half];
    h[f] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    h[f + half] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
}

// x = act(x).
extern "C" __global__ void activate_inplace(long long n, int act, float* __restrict__ x) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = activate(act, x[i]);
}

// gate = act(gate) * up (SiLU * up for gated MLPs; ReLU etc. for the others).
extern "C" __global__ void gated_act(long long n, int act, float* __restrict__ gate,
                                     const float* __restrict__ up) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = __fmul_rn(activate(act, gate[i]), up[i]);
}

// x <- H_b x on every run of `block` values (normalized Walsh-Hadamard; block a power of two,
// at most 4096): one thread block per run, the run in shared memory, log2(block) butterfly
// rounds. A rotated model's down-projection input.
extern "C" __global__ void hadamard_blocks(int block, float* __restrict__ x) {
    extern __shared__ float run[];
    float* base = x + (size_t)blockIdx.x * block;
    for (int i = threadIdx.x; i < block; i += blockDim.x) run[i] = base[i];
    __syncthreads();
    for (int h = 1; h < block; h <<= 1) {
        for (int t = threadIdx.x; t < block / 2; t += blockDim.x) {
            const int i = (t / h) * 2 * h + (t % h);
            const float a = run[i], b = run[i + h];
            run[i] = __fadd_rn(a, b);
            run[i + h] = __fsub_rn(a, b);
        }
        __syncthreads();
    }
    const float norm = rsqrtf((float)block);
    for (int i = threadIdx.x; i < block; i += blockDim.x) base[i] = __fmul_rn(run[i], norm);
}

// x += y (the residual stream).
extern "C" __global__ void add_inplace(long long n, float* __restrict__ x,
                                       const float* __restrict__ y) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = __fadd_rn(x[i], y[i]);
}

// out[r] = table[index[r]] for rows of dim floats (embedding gather; select_rows).
extern "C" __global__ void gather_rows(int rows, int dim, const int* __restrict__ index,
                                       const float* __restrict__ table, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * dim) return;
    const int r = (int)(i / dim), j = (int)(i % dim);
    out[i] = table[(size_t)index[r] * dim + j];
}

// x[r] += table[index[r]] (learned absolute positions).
extern "C" __global__ void add_rows(int rows, int dim, const int* __restrict__ index,
                                    const float* __restrict__ table, float* __restrict__ x) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * dim) return;
    const int r = (int)(i / dim), j = (int)(i % dim);
    x[i] = __fadd_rn(x[i], table[(size_t)index[r] * dim + j]);
}

// out[rows[i]] += weights[i] * y[i] for n picks (rows distinct within one call).
extern "C" __global__ void mix_rows(int n, int dim, const int* __restrict__ rows,
                                    const float* __restrict__ weights,
                                    const float* __restrict__ y, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)n * dim) return;
    const int p = (int)(i / dim), j = (int)(i % dim);
    float* o = out + (size_t)rows[p] * dim + j;
    *o = __fadd_rn(*o, __fmul_rn(weights[p], y[i]));
}

// out[r] += sigmoid(gate[r]) * y[r] (Qwen2-MoE's gated shared expert).
extern "C" __global__ void add_gated(int rows, int dim, const float* __restrict__ gate,
                                     const float* __restrict__ y, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * dim) return;
    const float g = 1.f / (1.f + expf(-gate[i / dim]));
    out[i] = __fadd_rn(out[i], __fmul_rn(g, y[i]));
}

// sizeof and every field's offset of the params.h structs, as nvcc lays them out, for the
// test that compares them with Rust's (bindgen's) layout.
#define EM_PROBE(T, F) out[n++] = (int)offsetof(T, F)
extern "C" __global__ void params_layout(int* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int n = 0;
    out[n++] = sizeof(EmGemmParams);
    EM_PROBE(EmGemmParams, m); EM_PROBE(EmGemmParams, n); EM_PROBE(EmGemmParams, k_padded);
    EM_PROBE(EmGemmParams, ldc); EM_PROBE(EmGemmParams, out_type);
    EM_PROBE(EmGemmParams, write_acc); EM_PROBE(EmGemmParams, has_bias);
    out[n++] = sizeof(EmQuantParams);
    EM_PROBE(EmQuantParams, rows); EM_PROBE(EmQuantParams, cols);
    EM_PROBE(EmQuantParams, k_padded); EM_PROBE(EmQuantParams, rms_norm);
    EM_PROBE(EmQuantParams, eps); EM_PROBE(EmQuantParams, has_smooth);
    out[n++] = sizeof(EmAttnParams);
    EM_PROBE(EmAttnParams, q_rows); EM_PROBE(EmAttnParams, num_heads);
    EM_PROBE(EmAttnParams, num_kv_heads); EM_PROBE(EmAttnParams, head_dim);
    EM_PROBE(EmAttnParams, slots); EM_PROBE(EmAttnParams, split_len);
    EM_PROBE(EmAttnParams, splits); EM_PROBE(EmAttnParams, window);
    EM_PROBE(EmAttnParams, scale); EM_PROBE(EmAttnParams, want_mass);
    out[n++] = sizeof(EmRouteParams);
    EM_PROBE(EmRouteParams, rows); EM_PROBE(EmRouteParams, experts);
    EM_PROBE(EmRouteParams, top_k); EM_PROBE(EmRouteParams, renormalize);
}

// out = x * s[col] (SmoothQuant's input scale before a non-int8 linear).
extern "C" __global__ void scale_cols(int rows, int cols, const float* __restrict__ s,
                                      const float* __restrict__ x, float* __restrict__ out) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)rows * cols) out[i] = __fmul_rn(x[i], s[i % cols]);
}
