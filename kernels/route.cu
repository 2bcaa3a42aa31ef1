// MoE routing on the device: softmax over a row's expert logits, top-k (ties to the lower
// expert, as the CPU's strict comparison does), optional renormalization; and the sort of a
// step's picks by expert that grouped expert execution runs on.
#include "common.cuh"

// One thread per row (rows are tokens of a step, experts a few dozen at most).
// experts_out / weights_out: rows x top_k, in pick order.
extern "C" __global__ void route_topk(EmRouteParams p, const float* __restrict__ logits,
                                      int* __restrict__ experts_out,
                                      float* __restrict__ weights_out) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= p.rows) return;
    const float* l = logits + (size_t)row * p.experts;
    float mx = -INFINITY;
    for (int e = 0; e < p.experts; ++e) mx = fmaxf(mx, l[e]);
    float sum = 0.f;
    for (int e = 0; e < p.experts; ++e) sum += expf(l[e] - mx);
    // Chosen experts as a bit set (at most 64 experts; the host refuses more).
    unsigned long long taken = 0;
    float picked_sum = 0.f;
    const int k = min(p.top_k, p.experts);
    for (int i = 0; i < k; ++i) {
        int best = -1;
        float best_p = 0.f;
        for (int e = 0; e < p.experts; ++e) {
            if (taken >> e & 1ull) continue;
            const float pe = expf(l[e] - mx) / sum;
            if (best < 0 || pe > best_p) {
                best = e;
                best_p = pe;
            }
        }
        taken |= 1ull << best;
        experts_out[row * p.top_k + i] = best;
        weights_out[row * p.top_k + i] = best_p;
        picked_sum += best_p;
    }
    if (p.renormalize)
        for (int i = 0; i < k; ++i) weights_out[row * p.top_k + i] /= picked_sum;
}

// Stable counting sort of n picks by expert, in one block of at least `experts` threads:
// offsets[e]..offsets[e+1] index order[], which lists pick indices expert by expert, each
// expert's in pick order.
extern "C" __global__ void moe_sort(int n, int experts, const int* __restrict__ expert_of,
                                    int* __restrict__ offsets, int* __restrict__ order) {
    extern __shared__ int counts[];
    const int e = threadIdx.x;
    if (e < experts) {
        int c = 0;
        for (int i = 0; i < n; ++i) c += expert_of[i] == e;
        counts[e] = c;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int i = 0; i < experts; ++i) {
            const int c = counts[i];
            counts[i] = run;
            offsets[i] = run;
            run += c;
        }
        offsets[experts] = run;
    }
    __syncthreads();
    if (e < experts) {
        int at = counts[e];
        for (int i = 0; i < n; ++i)
            if (expert_of[i] == e) order[at++] = i;
    }
}
