// W8A8 GEMM on tensor cores: y[m][n] = s_tok[m] * s_chan[n] * sum_k a[m][k] * b[n][k] (+ bias).
// a (activations, m x k_padded) and b (weights, n x k_padded, one row per output channel) are
// int8, zero padded to k_padded (a multiple of 64), so no tile ever needs a k tail.
// mma.sync m16n8k32 s8 x s8 -> s32 accumulates exactly; cp.async fills a multi-stage shared
// memory ring so loads of stage s+STAGES-1 overlap the math of stage s.
#include "common.cuh"

namespace {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when `valid` is false (rows past m
// or n), reading nothing from `src`.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ __forceinline__ T convert_out(float v);
template <>
__device__ __forceinline__ float convert_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half convert_out<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert_out<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// The epilogue of one warp's MT x NT mma tiles; (rb, cb): the thread's first row and column.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_tile(const EmGemmParams& p, T* out, int* acc_out,
                                           const float* sa, const float* sb, const float* bias,
                                           const int (&acc)[MT][NT][4], int rb, int cb) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = rb + i * 16 + (e >> 1) * 8, c = cb + j * 8 + (e & 1);
                if (r < p.m && c < p.n) {
                    const int a = acc[i][j][e];
                    if (p.write_acc) acc_out[(size_t)r * p.n + c] = a;
                    out[(size_t)r * p.ldc + c] =
                        convert_out<T>(em::w8a8_epilogue(a, sa[r], sb[c], bias, p.has_bias, c));
                }
            }
}

// One BM x BN output tile per block, WM x WN warps, BK bytes of k per stage.
// Shared rows are BK + 16 bytes apart: with BK = 32 or 64 the eight row groups of a fragment
// load then fall on disjoint banks.
template <int BM, int BN, int BK, int WM, int WN, int STAGES>
__device__ __forceinline__ void gemm_tile(const EmGemmParams& p, const int8_t* __restrict__ A,
                                          const float* __restrict__ sa,
                                          const int8_t* __restrict__ B,
                                          const float* __restrict__ sb,
                                          const float* __restrict__ bias, void* out, int* acc_out) {
    constexpr int THREADS = WM * WN * 32;
    constexpr int SROW = BK + 16;
    constexpr int WTM = BM / WM, WTN = BN / WN;
    constexpr int MT = WTM / 16, NT = WTN / 8;
    constexpr int CHUNKS = BK / 16;
    static_assert(MT * 16 == WTM && NT * 8 == WTN, "warp tile must be whole mma tiles");
    static_assert(BK % 32 == 0, "BK must be whole mma k steps");

    __shared__ __align__(16) int8_t As[STAGES][BM * SROW];
    __shared__ __align__(16) int8_t Bs[STAGES][BN * SROW];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int wm = warp / WN, wn = warp % WN;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int ktiles = p.k_padded / BK;
    const size_t ld = static_cast<size_t>(p.k_padded);

    auto load = [&](int stage, int kt) {
        const int k0 = kt * BK;
        for (int c = tid; c < BM * CHUNKS; c += THREADS) {
            const int row = c / CHUNKS, col = (c % CHUNKS) * 16;
            const bool ok = m0 + row < p.m;
            const int8_t* src = A + (ok ? (m0 + row) * ld : 0) + k0 + col;
            cp_async16(&As[stage][row * SROW + col], src, ok);
        }
        for (int c = tid; c < BN * CHUNKS; c += THREADS) {
            const int row = c / CHUNKS, col = (c % CHUNKS) * 16;
            const bool ok = n0 + row < p.n;
            const int8_t* src = B + (ok ? (n0 + row) * ld : 0) + k0 + col;
            cp_async16(&Bs[stage][row * SROW + col], src, ok);
        }
    };

    int acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ktiles) load(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        // Stage kt has landed (at most STAGES-2 newer groups still in flight), and every warp
        // has finished reading the slot the next load overwrites (computed at kt-1).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < ktiles) load(next % STAGES, next);
        cp_async_commit();

        const int8_t* as = As[kt % STAGES];
        const int8_t* bs = Bs[kt % STAGES];
#pragma unroll
        for (int kk = 0; kk < BK; kk += 32) {
            // Fragments as PTX's m16n8k32 .s8 layout defines them: A rows g and g+8, bytes
            // 4t..4t+3 and 16+4t..; B column (output channel) g, the same k bytes.
            unsigned af[MT][4], bf[NT][2];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int8_t* base = as + (wm * WTM + i * 16 + g) * SROW + kk + t * 4;
                af[i][0] = *reinterpret_cast<const unsigned*>(base);
                af[i][1] = *reinterpret_cast<const unsigned*>(base + 8 * SROW);
                af[i][2] = *reinterpret_cast<const unsigned*>(base + 16);
                af[i][3] = *reinterpret_cast<const unsigned*>(base + 8 * SROW + 16);
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const int8_t* base = bs + (wn * WTN + j * 8 + g) * SROW + kk + t * 4;
                bf[j][0] = *reinterpret_cast<const unsigned*>(base);
                bf[j][1] = *reinterpret_cast<const unsigned*>(base + 16);
            }
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
                for (int j = 0; j < NT; ++j) mma_s8(acc[i][j], af[i], bf[j]);
        }
    }
    cp_async_wait<0>();

    // Accumulator layout: c0, c1 at row g, columns 2t and 2t+1; c2, c3 at row g+8. One
    // store loop per output type, so each stays small enough to unroll (a switch inside
    // the loop kept it rolled and put the accumulators in local memory).
    const int rb = m0 + wm * WTM + g, cb = n0 + wn * WTN + t * 2;
    switch (p.out_type) {
        case EM_OUT_F16:
            store_tile<__half, MT, NT>(p, static_cast<__half*>(out), acc_out, sa, sb, bias, acc, rb, cb);
            break;
        case EM_OUT_BF16:
            store_tile<__nv_bfloat16, MT, NT>(p, static_cast<__nv_bfloat16*>(out), acc_out, sa, sb,
                                              bias, acc, rb, cb);
            break;
        default:
            store_tile<float, MT, NT>(p, static_cast<float*>(out), acc_out, sa, sb, bias, acc, rb, cb);
            break;
    }
}

// Decode: one warp per output channel streams its weight row once (16-byte loads that bypass
// L1) and dots it with every one of the M <= 8 activation rows (dp4a, exact).
template <int M>
__device__ __forceinline__ void gemv_rows(const EmGemmParams& p, const int8_t* __restrict__ A,
                                          const float* __restrict__ sa,
                                          const int8_t* __restrict__ B,
                                          const float* __restrict__ sb,
                                          const float* __restrict__ bias, void* out, int* acc_out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n = blockIdx.x * (blockDim.x >> 5) + warp;
    if (n >= p.n) return;
    const size_t ld = static_cast<size_t>(p.k_padded);
    const int4* w = reinterpret_cast<const int4*>(B + n * ld);
    const int chunks = p.k_padded / 16;
    int acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
        const int4 wv = __ldcs(w + c);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const int4 xv = __ldg(reinterpret_cast<const int4*>(A + m * ld) + c);
            acc[m] = __dp4a(wv.x, xv.x, acc[m]);
            acc[m] = __dp4a(wv.y, xv.y, acc[m]);
            acc[m] = __dp4a(wv.z, xv.z, acc[m]);
            acc[m] = __dp4a(wv.w, xv.w, acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const int total = em::warp_sum_i32(acc[m]);
        if (lane == m) em::w8a8_store(p, out, acc_out, sa, sb, bias, m, n, total);
    }
}

}  // namespace

// Prefill-sized M: 128 x 128 tiles, 8 warps of 64 x 32, 3 stages of 32 bytes of k (36 KiB).
extern "C" __global__ void __launch_bounds__(256)
    gemm_w8a8_large(EmGemmParams p, const int8_t* A, const float* sa, const int8_t* B,
                    const float* sb, const float* bias, void* out, int* acc_out) {
    gemm_tile<128, 128, 32, 2, 4, 3>(p, A, sa, B, sb, bias, out, acc_out);
}

// Small M (decode batches above the GEMV's 8, short prompts): 32 x 128 tiles, 4 warps of
// 32 x 32, 3 stages of 64 bytes of k (37.5 KiB), so small M still spreads over many blocks.
extern "C" __global__ void __launch_bounds__(128)
    gemm_w8a8_small(EmGemmParams p, const int8_t* A, const float* sa, const int8_t* B,
                    const float* sb, const float* bias, void* out, int* acc_out) {
    gemm_tile<32, 128, 64, 1, 4, 3>(p, A, sa, B, sb, bias, out, acc_out);
}

// M <= 8; blocks of 256 threads (8 output channels each).
extern "C" __global__ void __launch_bounds__(256)
    gemv_w8a8(EmGemmParams p, const int8_t* A, const float* sa, const int8_t* B, const float* sb,
              const float* bias, void* out, int* acc_out) {
    switch (p.m) {
        case 1: gemv_rows<1>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 2: gemv_rows<2>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 3: gemv_rows<3>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 4: gemv_rows<4>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 5: gemv_rows<5>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 6: gemv_rows<6>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 7: gemv_rows<7>(p, A, sa, B, sb, bias, out, acc_out); break;
        case 8: gemv_rows<8>(p, A, sa, B, sb, bias, out, acc_out); break;
        default: break;
    }
}

// f32 y = x * W^T (+ bias) for the linears that are not W8A8 (an f32 or half head, weight-only
// int8, all dequantized to f32 rows at upload): 64 x 64 tiles, 16 x 16 threads of 4 x 4.
extern "C" __global__ void __launch_bounds__(256)
    gemm_f32(int m, int n, int k, const float* __restrict__ X, const float* __restrict__ W,
             const float* __restrict__ bias, int has_bias, float* __restrict__ Y) {
    constexpr int T = 64, KT = 16;
    __shared__ float xs[KT][T + 1];
    __shared__ float ws[KT][T + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int m0 = blockIdx.y * T, n0 = blockIdx.x * T;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += KT) {
        for (int i = threadIdx.x; i < T * KT; i += 256) {
            const int r = i / KT, kk = i % KT;
            const int gk = k0 + kk;
            xs[kk][r] = (m0 + r < m && gk < k) ? X[(size_t)(m0 + r) * k + gk] : 0.f;
            ws[kk][r] = (n0 + r < n && gk < k) ? W[(size_t)(n0 + r) * k + gk] : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KT; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty * 4 + i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx * 4 + j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = m0 + ty * 4 + i;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = n0 + tx * 4 + j;
            if (r < m && c < n) Y[(size_t)r * n + c] = acc[i][j] + (has_bias ? bias[c] : 0.f);
        }
    }
}

// Grouped expert execution: blockIdx.z is an expert; its rows are offsets[e]..offsets[e+1] of
// A (activations already sorted by expert, moe_sort), its weights w_ptrs[e] / s_ptrs[e]. One
// launch runs every expert of a step; blocks past an expert's rows exit at once.
extern "C" __global__ void __launch_bounds__(128)
    gemm_w8a8_grouped(EmGemmParams p, const int8_t* A, const float* sa,
                      const int8_t* const* w_ptrs, const float* const* s_ptrs,
                      const int* offsets, float* out, int* acc_out) {
    const int e = blockIdx.z;
    const int r0 = offsets[e], rows = offsets[e + 1] - r0;
    if ((int)blockIdx.y * 32 >= rows) return;
    EmGemmParams q = p;
    q.m = rows;
    const size_t ld = (size_t)p.k_padded;
    gemm_tile<32, 128, 64, 1, 4, 3>(q, A + r0 * ld, sa + r0, w_ptrs[e], s_ptrs[e], nullptr,
                                    out + (size_t)r0 * p.ldc,
                                    p.write_acc ? acc_out + (size_t)r0 * p.n : nullptr);
}
