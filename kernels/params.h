/* Structs passed by value from Rust to the kernels. One definition for both sides: nvcc
 * includes this file, and build.rs turns it into Rust with bindgen (src/backend/cuda/params.rs
 * includes the result; tests/cuda.rs checks nvcc's sizes and offsets against Rust's).
 * Plain C types only (no headers), so libclang needs no system includes. */
#ifndef EDGEMOE_PARAMS_H
#define EDGEMOE_PARAMS_H

/* Output element types of the GEMM epilogue. */
enum EmOutType { EM_OUT_F32 = 0, EM_OUT_F16 = 1, EM_OUT_BF16 = 2 };

/* y[m][n] = s_tok[m] * s_chan[n] * (sum_k a[m][k] * b[n][k]) (+ bias[n]).
 * a: m x k_padded int8, b: n x k_padded int8, both zero padded; k_padded % 64 == 0. */
typedef struct EmGemmParams {
    int m;
    int n;
    int k_padded;
    /* Row stride of the output, in elements (>= n). */
    int ldc;
    /* One of EmOutType. */
    int out_type;
    /* Non-zero: also write the raw int32 accumulators (the bit-exactness checks). */
    int write_acc;
    /* Non-zero: add bias[n]. */
    int has_bias;
    int pad0;
} EmGemmParams;

/* Per-token quantization of rows x cols f32 into rows x k_padded int8 + one scale a row,
 * after an optional RMS norm (weight, eps) and an optional per-column input scale. */
typedef struct EmQuantParams {
    int rows;
    int cols;
    int k_padded;
    /* Non-zero: RMS-normalize each row first (and write the normalized f32 row too). */
    int rms_norm;
    float eps;
    /* Non-zero: multiply by inv_smooth[col] before quantizing. */
    int has_smooth;
    int pad0;
    int pad1;
} EmQuantParams;

/* Masked attention of q rows over one sequence's KV slots. */
typedef struct EmAttnParams {
    /* Query rows (tokens) of the call. */
    int q_rows;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    /* KV slots of the sequence. */
    int slots;
    /* Slots per split (split-KV decode); the grid has ceil(slots / split_len) splits. */
    int split_len;
    int splits;
    /* A slot is visible to a query at position p when its position s <= p and, when
     * window > 0, p - s < window; and its validity byte is non-zero. */
    int window;
    float scale;
    /* Non-zero: accumulate each slot's attention mass (sum over heads and query rows of
     * its softmax probability) into mass[slot]. */
    int want_mass;
    int pad0;
    int pad1;
} EmAttnParams;

/* Router: softmax over experts, top-k (ties to the lower index), optional renormalization. */
typedef struct EmRouteParams {
    int rows;
    int experts;
    int top_k;
    int renormalize;
} EmRouteParams;

#endif
