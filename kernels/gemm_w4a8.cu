// W4A8 product over the tiled int4 layout of src/model/int4.rs: y[m][j] = s_tok[m] *
// sum_g (d[m][j][g] * scale[j][g]) (+ bias[j]), d the exact int32 dot product of group g of
// the token's int8 activations with the unsigned nibbles of row j, minus zero[j][g] times the
// group's activation sum. The f32 part is the CPU's operations in its order, each rounded
// (__fmul_rn / __fadd_rn: no contraction into FMA), so the outputs equal the CPU's bit for bit.
//
// One warp per 16-row tile and up to TOKENS tokens: lane r (and r + 16) owns row r; the two
// half-warps take alternate 64-byte steps of a group, each lane reading its row's 4 bytes of
// the step (a half-warp reads the step's 64 bytes, coalesced), and dp4a adds 4 columns at a
// time (nibbles are 0..15, the same as signed bytes). The halves meet by one shuffle a group.
#include "common.cuh"

namespace {

constexpr int TOKENS = 8;
constexpr int WARPS = 8;

}  // namespace

// Grid: (ceil(tiles / WARPS), ceil(m / TOKENS)), blocks of WARPS warps.
// A: m x k_x int8 (k_x = the activations' padded k, a multiple of 64, <= k_w); sa: m scales.
// W: tiles x (k_w / 8) x 64 bytes; scales (f16 bits) and zeros: tiles x (k_w / group) x 16.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
    gemm_w4a8(int m, int n, int k_x, int k_w, int group, int has_zeros, int has_bias,
              const int8_t* __restrict__ A, const float* __restrict__ sa,
              const uint8_t* __restrict__ W, const unsigned short* __restrict__ scales,
              const uint8_t* __restrict__ zeros, const float* __restrict__ bias,
              float* __restrict__ out) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int tile = blockIdx.x * WARPS + warp;
    const int tiles = (n + 15) / 16;
    if (tile >= tiles) return;
    const int r = lane & 15, half = lane >> 4;
    const int m0 = blockIdx.y * TOKENS;
    const int tokens = min(TOKENS, m - m0);
    const int groups_w = k_w / group, groups_x = (k_x + group - 1) / group;
    const size_t tile_bytes = (size_t)k_w * 8;
    const uint8_t* wt = W + tile * tile_bytes + 4 * r;
    const unsigned short* st = scales + (size_t)tile * groups_w * 16 + r;
    const uint8_t* zt = zeros + (size_t)tile * groups_w * 16 + r;

    float f[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) f[t] = 0.f;
    for (int g = 0; g < groups_x; ++g) {
        const int s0 = g * group / 8, s1 = min((g + 1) * group, k_x) / 8;
        int d[TOKENS], xs[TOKENS];
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) d[t] = xs[t] = 0;
        for (int s = s0 + half; s < s1; s += 2) {
            const unsigned v = __ldcs(reinterpret_cast<const unsigned*>(wt + (size_t)s * 64));
            const int lo = (int)(v & 0x0f0f0f0fu), hi = (int)((v >> 4) & 0x0f0f0f0fu);
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) {
                if (t < tokens) {
                    const int* x = reinterpret_cast<const int*>(A + (size_t)(m0 + t) * k_x + s * 8);
                    const int x0 = __ldg(x), x1 = __ldg(x + 1);
                    d[t] = __dp4a(lo, x0, d[t]);
                    d[t] = __dp4a(hi, x1, d[t]);
                    xs[t] = __dp4a(0x01010101, x0, xs[t]);
                    xs[t] = __dp4a(0x01010101, x1, xs[t]);
                }
            }
        }
        const int zero = has_zeros ? (int)zt[g * 16] : 8;
        const float scale = __half2float(__ushort_as_half(st[g * 16]));
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
            const int dt = d[t] + __shfl_xor_sync(0xffffffffu, d[t], 16);
            const int xt = xs[t] + __shfl_xor_sync(0xffffffffu, xs[t], 16);
            f[t] = __fadd_rn(f[t], __fmul_rn((float)(dt - zero * xt), scale));
        }
    }
    const int j = tile * 16 + r;
    if (half != 0 || j >= n) return;
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        if (t < tokens) {
            float v = __fmul_rn(f[t], sa[m0 + t]);
            if (has_bias) v = __fadd_rn(v, bias[j]);
            out[(size_t)(m0 + t) * n + j] = v;
        }
    }
}
