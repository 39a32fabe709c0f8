// Bias + activation and gated activation, elementwise over a (rows, n) view; fp32 math, one rounding at the end.
//
//     bias_activation:  y = act(x + bias)        bias (n,) in x's dtype or fp32, or none
//     gated_activation: y = act(gate) * up       gate and up with their own row strides (halves of one tensor work)
//
//     quick_gelu: x * sigmoid(1.702 x)
//     gelu:       0.5 x (1 + erf(x / sqrt(2)))
//     gelu_tanh:  x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))   ( == 0.5 x (1 + tanh(...)), no 1 + tanh cancellation)
//     relu:       max(x, 0), NaN stays NaN
//
// A grid-stride loop over VEC-wide column groups (16-byte loads when n, the row strides and the pointers allow it),
// the output written contiguous.
#include "common.cuh"
#include "fastenc_cuda.h"

namespace fastenc {
namespace {

constexpr int kThreads = 256;

template <int ACT>
__device__ __forceinline__ float activate(float x) {
  if (ACT == FASTENC_QUICK_GELU) return x / (1.0f + expf(-1.702f * x));
  if (ACT == FASTENC_GELU) return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  if (ACT == FASTENC_GELU_TANH) {
    const float u = 1.5957691216057308f * (x + 0.044715f * x * x * x);  // 2 sqrt(2/pi) (x + 0.044715 x^3)
    return x / (1.0f + expf(-u));
  }
  return x < 0.0f ? 0.0f : x;  // relu; NaN stays NaN as torch.relu (fmaxf(NaN, 0) would give 0)
}

template <typename T, typename B, int ACT, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_activation_kernel(const T* __restrict__ x, int64_t stride_x, const B* __restrict__ bias, T* __restrict__ y,
                           int64_t rows, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t total = rows * nvec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec;
    const int64_t col = (i - row * nvec) * VEC;
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + row * stride_x + col);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float h = to_float(xv.v[j]);
      if (bias != nullptr) h += to_float(bias[col + j]);
      out.v[j] = from_float<T>(activate<ACT>(h));
    }
    store_vec<T, VEC>(y + row * n + col, out);
  }
}

template <typename T, int ACT, int VEC>
__global__ void __launch_bounds__(kThreads)
    gated_activation_kernel(const T* __restrict__ gate, int64_t stride_gate, const T* __restrict__ up,
                            int64_t stride_up, T* __restrict__ y, int64_t rows, int64_t n) {
  const int64_t nvec = n / VEC;
  const int64_t total = rows * nvec;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / nvec;
    const int64_t col = (i - row * nvec) * VEC;
    const Vec<T, VEC> gv = load_vec<T, VEC>(gate + row * stride_gate + col);
    const Vec<T, VEC> uv = load_vec<T, VEC>(up + row * stride_up + col);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(activate<ACT>(to_float(gv.v[j])) * to_float(uv.v[j]));
    store_vec<T, VEC>(y + row * n + col, out);
  }
}

unsigned grid_for(int64_t work) {
  int64_t blocks = (work + kThreads - 1) / kThreads;
  const int64_t cap = 1 << 20;  // the loop strides over the rest
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > cap ? cap : blocks));
}

template <typename T, typename B, int ACT>
cudaError_t launch_bias(const void* x, int64_t sx, const void* bias, void* y, int64_t rows, int64_t n,
                        cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(x) && aligned16(y) && (sx * sizeof(T)) % 16 == 0;
  if (vec) {
    bias_activation_kernel<T, B, ACT, kVec><<<grid_for(rows * (n / kVec)), kThreads, 0, stream>>>(
        static_cast<const T*>(x), sx, static_cast<const B*>(bias), static_cast<T*>(y), rows, n);
  } else {
    bias_activation_kernel<T, B, ACT, 1><<<grid_for(rows * n), kThreads, 0, stream>>>(
        static_cast<const T*>(x), sx, static_cast<const B*>(bias), static_cast<T*>(y), rows, n);
  }
  return cudaGetLastError();
}

template <typename T, int ACT>
cudaError_t launch_gated(const void* g, int64_t sg, const void* u, int64_t su, void* y, int64_t rows, int64_t n,
                         cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(g) && aligned16(u) && aligned16(y) && (sg * sizeof(T)) % 16 == 0 &&
                   (su * sizeof(T)) % 16 == 0;
  if (vec) {
    gated_activation_kernel<T, ACT, kVec><<<grid_for(rows * (n / kVec)), kThreads, 0, stream>>>(
        static_cast<const T*>(g), sg, static_cast<const T*>(u), su, static_cast<T*>(y), rows, n);
  } else {
    gated_activation_kernel<T, ACT, 1><<<grid_for(rows * n), kThreads, 0, stream>>>(
        static_cast<const T*>(g), sg, static_cast<const T*>(u), su, static_cast<T*>(y), rows, n);
  }
  return cudaGetLastError();
}

template <typename T, typename B>
cudaError_t bias_by_act(int act, const void* x, int64_t sx, const void* bias, void* y, int64_t rows, int64_t n,
                        cudaStream_t s) {
  switch (act) {
    case FASTENC_QUICK_GELU: return launch_bias<T, B, FASTENC_QUICK_GELU>(x, sx, bias, y, rows, n, s);
    case FASTENC_GELU: return launch_bias<T, B, FASTENC_GELU>(x, sx, bias, y, rows, n, s);
    case FASTENC_GELU_TANH: return launch_bias<T, B, FASTENC_GELU_TANH>(x, sx, bias, y, rows, n, s);
    case FASTENC_RELU: return launch_bias<T, B, FASTENC_RELU>(x, sx, bias, y, rows, n, s);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t gated_by_act(int act, const void* g, int64_t sg, const void* u, int64_t su, void* y, int64_t rows,
                         int64_t n, cudaStream_t s) {
  switch (act) {
    case FASTENC_QUICK_GELU: return launch_gated<T, FASTENC_QUICK_GELU>(g, sg, u, su, y, rows, n, s);
    case FASTENC_GELU: return launch_gated<T, FASTENC_GELU>(g, sg, u, su, y, rows, n, s);
    case FASTENC_GELU_TANH: return launch_gated<T, FASTENC_GELU_TANH>(g, sg, u, su, y, rows, n, s);
    case FASTENC_RELU: return launch_gated<T, FASTENC_RELU>(g, sg, u, su, y, rows, n, s);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace fastenc

extern "C" cudaError_t fastenc_bias_activation_fwd(const void* x, int64_t stride_x, const void* bias, int bias_dtype,
                                                   void* y, int64_t rows, int64_t n, int activation, int x_dtype,
                                                   cudaStream_t stream) {
  using namespace fastenc;
  if (rows < 0 || n < 0) return cudaErrorInvalidValue;
  if (rows == 0 || n == 0) return cudaSuccess;
  // bias in x's dtype, or fp32 (the binding upcasts any other bias dtype losslessly)
  const bool f32_bias = bias != nullptr && bias_dtype == FASTENC_F32;
  if (bias != nullptr && bias_dtype != x_dtype && !f32_bias) return cudaErrorInvalidValue;
  switch (x_dtype) {
    case FASTENC_F32: return bias_by_act<float, float>(activation, x, stride_x, bias, y, rows, n, stream);
    case FASTENC_F16:
      return f32_bias ? bias_by_act<__half, float>(activation, x, stride_x, bias, y, rows, n, stream)
                      : bias_by_act<__half, __half>(activation, x, stride_x, bias, y, rows, n, stream);
    case FASTENC_BF16:
      return f32_bias ? bias_by_act<__nv_bfloat16, float>(activation, x, stride_x, bias, y, rows, n, stream)
                      : bias_by_act<__nv_bfloat16, __nv_bfloat16>(activation, x, stride_x, bias, y, rows, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t fastenc_gated_activation_fwd(const void* gate, int64_t stride_gate, const void* up,
                                                    int64_t stride_up, void* y, int64_t rows, int64_t n,
                                                    int activation, int dtype, cudaStream_t stream) {
  using namespace fastenc;
  if (rows < 0 || n < 0) return cudaErrorInvalidValue;
  if (rows == 0 || n == 0) return cudaSuccess;
  switch (dtype) {
    case FASTENC_F32: return gated_by_act<float>(activation, gate, stride_gate, up, stride_up, y, rows, n, stream);
    case FASTENC_F16: return gated_by_act<__half>(activation, gate, stride_gate, up, stride_up, y, rows, n, stream);
    case FASTENC_BF16:
      return gated_by_act<__nv_bfloat16>(activation, gate, stride_gate, up, stride_up, y, rows, n, stream);
    default: return cudaErrorInvalidValue;
  }
}
