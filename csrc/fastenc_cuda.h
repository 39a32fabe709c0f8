// Host-side C API of the fastenc CUDA kernels: raw pointers, sizes, row strides (in elements) and a stream.
// No torch headers: bindings.cpp (the only file that includes torch) calls these after checking the tensors.
// Every launcher returns cudaSuccess or the error of the failed CUDA call (launch errors included).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types, as the binding maps them from torch dtypes.
enum FastencDtype { FASTENC_F32 = 0, FASTENC_F16 = 1, FASTENC_BF16 = 2 };

// Activations of bias_activation / gated_activation, in the order of kernels/activation.py's ACTIVATIONS.
enum FastencActivation { FASTENC_QUICK_GELU = 0, FASTENC_GELU = 1, FASTENC_GELU_TANH = 2, FASTENC_RELU = 3 };

// ------------------------------------------------------------------------------------------------ norm.cu
// Widest row the norm kernels cache (as fp32) in shared memory: 16384 columns = 64 KiB.
#define FASTENC_NORM_MAX_N 16384

// s = x + residual (rounded to x's dtype, stored to res_out), y = LayerNorm(s) * w + b in x's dtype.
// residual / res_out / bias may be NULL. weight and bias share w_dtype. Columns are contiguous.
cudaError_t fastenc_layer_norm_fwd(const void* x, int64_t stride_x, const void* residual, int64_t stride_r,
                                   const void* weight, const void* bias, void* y, int64_t stride_y, void* res_out,
                                   int64_t stride_res_out, int64_t rows, int64_t n, float eps, int x_dtype,
                                   int w_dtype, cudaStream_t stream);

// T5 RMSNorm: y = w * (s * rsqrt(mean(s^2) + eps)); y has w's dtype when w is fp16/bf16 (the normalised value is
// rounded to it first), else x's dtype.
cudaError_t fastenc_rms_norm_fwd(const void* x, int64_t stride_x, const void* residual, int64_t stride_r,
                                 const void* weight, void* y, int64_t stride_y, void* res_out, int64_t stride_res_out,
                                 int64_t rows, int64_t n, float eps, int x_dtype, int w_dtype, cudaStream_t stream);

// ------------------------------------------------------------------------------------------ activation.cu
// y = act(x + bias), y contiguous (rows, n) in x's dtype. bias may be NULL; bias_dtype is x_dtype or FASTENC_F32.
cudaError_t fastenc_bias_activation_fwd(const void* x, int64_t stride_x, const void* bias, int bias_dtype, void* y,
                                        int64_t rows, int64_t n, int activation, int x_dtype, cudaStream_t stream);

// y = act(gate) * up, y contiguous (rows, n); gate and up share dtype, each with its own row stride.
cudaError_t fastenc_gated_activation_fwd(const void* gate, int64_t stride_gate, const void* up, int64_t stride_up,
                                         void* y, int64_t rows, int64_t n, int activation, int dtype,
                                         cudaStream_t stream);

// ------------------------------------------------------------------------------- attention_{f16,bf16}.cu
// Short-sequence attention: K and V of one (batch, head) live in shared memory, so Sk is bounded.
#define FASTENC_ATTN_MAX_SEQLEN_K 128
#define FASTENC_ATTN_MAX_HEAD_DIM 128

typedef struct FastencAttnArgs {
  const void* q;  // (B, H, Sq, D), unit stride on D
  const void* k;  // (B, H, Sk, D), unit stride on D
  const void* v;  // (B, H, Sk, D), unit stride on D
  void* out;      // (B, H, Sq, D), unit stride on D
  const uint8_t* key_padding_mask;  // (B, Sk), nonzero = attend; NULL = none
  int64_t q_stride_b, q_stride_h, q_stride_s;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  int64_t o_stride_b, o_stride_h, o_stride_s;
  int64_t kpm_stride_b, kpm_stride_s;
  int batch, heads, seqlen_q, seqlen_k, head_dim;
  float scale;  // multiplies q . k
  int causal;   // key j > query i is masked (top-left aligned)
} FastencAttnArgs;

cudaError_t fastenc_attention_fwd_f16(const FastencAttnArgs* args, cudaStream_t stream);
cudaError_t fastenc_attention_fwd_bf16(const FastencAttnArgs* args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
