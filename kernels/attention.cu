// Masked attention over one sequence's KV slots, for prefill (many query rows, causal by
// position) and decode (one row) alike. A slot is visible to a query at position p when its
// validity byte is set, its position s <= p, and (with a window) p - s < window: slots are
// matched by the slot -> position map, never by index, so an eviction policy may drop and
// compact slots freely. Split-KV: each block reduces one (row, head, split of slots) to a
// partial (max, sum, weighted values); attention_merge combines the splits by log-sum-exp.
// With want_mass, each slot's attention mass (sum over heads and rows of its probability)
// is accumulated for the eviction policy.
#include "common.cuh"

namespace {
constexpr int ATT_WARPS = 4;
constexpr int MAX_HEAD_DIM = 256;
constexpr int PER_LANE = MAX_HEAD_DIM / 32;

__device__ __forceinline__ bool visible(const EmAttnParams& p, const unsigned char* valid,
                                        const int* slot_pos, int s, int qp) {
    const int sp = slot_pos[s];
    return valid[s] && sp <= qp && (p.window <= 0 || qp - sp < p.window);
}
}  // namespace

// grid (q_rows, num_heads, splits), ATT_WARPS warps. part_ml: (row, head, split) -> (max, sum);
// part_acc: (row, head, split) -> head_dim weighted value sums; scores (want_mass only):
// (row, head, slot) -> scaled score, -inf where hidden.
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
    attention_split(EmAttnParams p, const float* __restrict__ q, const int* __restrict__ q_pos,
                    const float* __restrict__ keys, const float* __restrict__ values,
                    const int* __restrict__ slot_pos, const unsigned char* __restrict__ valid,
                    float* __restrict__ part_ml, float* __restrict__ part_acc,
                    float* __restrict__ scores) {
    __shared__ float qs[MAX_HEAD_DIM];
    __shared__ float wm[ATT_WARPS], wl[ATT_WARPS];
    __shared__ float wacc[ATT_WARPS][MAX_HEAD_DIM];
    const int row = blockIdx.x, head = blockIdx.y, split = blockIdx.z;
    const int d = p.head_dim, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = head / (p.num_heads / p.num_kv_heads);
    const size_t kv_dim = (size_t)p.num_kv_heads * d;
    const int qp = q_pos[row];
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        qs[j] = q[((size_t)row * p.num_heads + head) * d + j];
    __syncthreads();

    const int s0 = split * p.split_len, s1 = min(p.slots, s0 + p.split_len);
    float m = -INFINITY, l = 0.f, acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) acc[i] = 0.f;
    for (int s = s0 + warp; s < s1; s += ATT_WARPS) {
        float* score_out = p.want_mass ? scores + ((size_t)row * p.num_heads + head) * p.slots + s
                                       : nullptr;
        if (!visible(p, valid, slot_pos, s, qp)) {
            if (lane == 0 && score_out) *score_out = -INFINITY;
            continue;
        }
        const float* k = keys + s * kv_dim + (size_t)kvh * d;
        float dot = 0.f;
        for (int j = lane; j < d; j += 32) dot += qs[j] * k[j];
        const float score = em::warp_sum(dot) * p.scale;
        if (lane == 0 && score_out) *score_out = score;
        const float nm = fmaxf(m, score);
        const float corr = expf(m - nm), e = expf(score - nm);
        l = l * corr + e;
        const float* v = values + s * kv_dim + (size_t)kvh * d;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const int j = lane + 32 * i;
            if (j < d) acc[i] = acc[i] * corr + e * v[j];
        }
        m = nm;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const int j = lane + 32 * i;
        if (j < d) wacc[warp][j] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, wm[w]);
    const size_t part = ((size_t)row * p.num_heads + head) * p.splits + split;
    // A split that sees no slot contributes (-inf, 0, zeros).
    float f[ATT_WARPS];
    for (int w = 0; w < ATT_WARPS; ++w) f[w] = M == -INFINITY ? 0.f : expf(wm[w] - M);
    if (threadIdx.x == 0) {
        float L = 0.f;
        for (int w = 0; w < ATT_WARPS; ++w) L += wl[w] * f[w];
        part_ml[part * 2] = M;
        part_ml[part * 2 + 1] = L;
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < ATT_WARPS; ++w) a += wacc[w][j] * f[w];
        part_acc[part * d + j] = a;
    }
}

// grid (q_rows, num_heads), 128 threads: out[row][head] = sum_s acc_s e^(m_s - M) / L, and
// final_ml (row, head) -> (M, L) for the mass pass.
extern "C" __global__ void attention_merge(EmAttnParams p, const float* __restrict__ part_ml,
                                           const float* __restrict__ part_acc,
                                           float* __restrict__ out, float* __restrict__ final_ml) {
    const int row = blockIdx.x, head = blockIdx.y, d = p.head_dim;
    const size_t base = ((size_t)row * p.num_heads + head) * p.splits;
    float M = -INFINITY;
    for (int s = 0; s < p.splits; ++s) M = fmaxf(M, part_ml[(base + s) * 2]);
    float L = 0.f;
    for (int s = 0; s < p.splits; ++s) {
        const float ms = part_ml[(base + s) * 2];
        if (ms != -INFINITY) L += part_ml[(base + s) * 2 + 1] * expf(ms - M);
    }
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float a = 0.f;
        for (int s = 0; s < p.splits; ++s) {
            const float ms = part_ml[(base + s) * 2];
            if (ms != -INFINITY) a += part_acc[(base + s) * d + j] * expf(ms - M);
        }
        out[((size_t)row * p.num_heads + head) * d + j] = L > 0.f ? a / L : 0.f;
    }
    if (threadIdx.x == 0) {
        final_ml[((size_t)row * p.num_heads + head) * 2] = M;
        final_ml[((size_t)row * p.num_heads + head) * 2 + 1] = L;
    }
}

// One thread per slot: mass[s] += sum over rows and heads of e^(score - M) / L.
extern "C" __global__ void attention_mass(EmAttnParams p, const float* __restrict__ scores,
                                          const float* __restrict__ final_ml,
                                          float* __restrict__ mass) {
    const int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= p.slots) return;
    float total = 0.f;
    for (int rh = 0; rh < p.q_rows * p.num_heads; ++rh) {
        const float sc = scores[(size_t)rh * p.slots + s];
        const float L = final_ml[rh * 2 + 1];
        if (sc != -INFINITY && L > 0.f) total += expf(sc - final_ml[rh * 2]) / L;
    }
    mass[s] += total;
}
