// LayerNorm and T5 RMSNorm forward over the last dim, each with an optional fused residual add.
//
// One block normalises one row. Pass 1 reads x (and residual) once with VEC-wide loads, forms
// s = x + residual rounded to x's dtype (stored to res_out, exactly as the eager `residual + hidden`), caches s as
// fp32 in shared memory and sums it; the statistics are exact two-pass fp32 sums over that cache:
//     layer_norm: y = (s - mean) * 1/sqrt(mean((s - mean)^2) + eps) * w + b      (biased variance)
//     rms_norm:   y = w * (s * 1/sqrt(mean(s^2) + eps)); for an fp16/bf16 w the normalised value is rounded to w's
//                 dtype first and y has w's dtype (T5LayerNorm), else y has x's dtype
// Rows up to FASTENC_NORM_MAX_N columns (the fp32 cache must fit shared memory); wider rows are refused.
#include "common.cuh"
#include "fastenc_cuda.h"

#include <type_traits>

namespace fastenc {
namespace {

template <typename T, typename W, bool RMS, int VEC>
__global__ void norm_fwd_kernel(const T* __restrict__ x, int64_t stride_x, const T* __restrict__ residual,
                                int64_t stride_r, const W* __restrict__ weight, const W* __restrict__ bias,
                                void* __restrict__ y_ptr, int64_t stride_y, T* __restrict__ res_out,
                                int64_t stride_res_out, int n, float eps) {
  // rms_norm with a half weight writes y in the weight's dtype; everything else writes x's dtype.
  using Y = typename std::conditional<RMS && !std::is_same<W, float>::value, W, T>::type;
  extern __shared__ float srow[];  // n floats, then 32 floats of reduction scratch
  float* scratch = srow + n;

  const int64_t row = blockIdx.x;
  x += row * stride_x;
  Y* y = reinterpret_cast<Y*>(y_ptr) + row * stride_y;
  const bool has_res = residual != nullptr;
  if (has_res) {
    residual += row * stride_r;
    res_out += row * stride_res_out;
  }
  const int nvec = n / VEC;

  float acc = 0.0f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<T, VEC> xv = load_vec<T, VEC>(x + i * VEC);
    if (has_res) {
      Vec<T, VEC> rv = load_vec<T, VEC>(residual + i * VEC);
      Vec<T, VEC> sv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sv.v[j] = from_float<T>(to_float(xv.v[j]) + to_float(rv.v[j]));
        xv.v[j] = sv.v[j];
      }
      store_vec<T, VEC>(res_out + i * VEC, sv);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float s = to_float(xv.v[j]);
      srow[i * VEC + j] = s;
      acc += RMS ? s * s : s;
    }
  }
  const float total = block_sum(acc, scratch);

  float mean = 0.0f;
  float rstd;
  if (RMS) {
    rstd = 1.0f / sqrtf(total / n + eps);
  } else {
    mean = total / n;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {  // each thread re-reads only what it wrote
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = srow[i * VEC + j] - mean;
        sq += c * c;
      }
    }
    rstd = 1.0f / sqrtf(block_sum(sq, scratch) / n + eps);
  }

  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Vec<Y, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int c = i * VEC + j;
      const float w = to_float(weight[c]);
      float v;
      if (RMS) {
        float h = srow[c] * rstd;
        if (!std::is_same<W, float>::value) h = to_float(from_float<W>(h));  // T5: round to w's dtype first
        v = w * h;  // a product of two halves is exact in fp32: one rounding to Y equals the eager half multiply
      } else {
        v = (srow[c] - mean) * rstd * w;
        if (bias != nullptr) v += to_float(bias[c]);
      }
      out.v[j] = from_float<Y>(v);
    }
    store_vec<Y, VEC>(y + i * VEC, out);
  }
}

template <typename T, typename W, bool RMS, int VEC>
cudaError_t launch_norm(const void* x, int64_t sx, const void* r, int64_t sr, const void* w, const void* b, void* y,
                        int64_t sy, void* ro, int64_t sro, int64_t rows, int n, float eps, cudaStream_t stream) {
  const int nvec = n / VEC;
  int threads = ((nvec + 3) / 4 + 31) / 32 * 32;  // about four vectors per thread
  threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
  const size_t smem = (static_cast<size_t>(n) + 32) * sizeof(float);
  auto kernel = norm_fwd_kernel<T, W, RMS, VEC>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
      static_cast<const T*>(x), sx, static_cast<const T*>(r), sr, static_cast<const W*>(w),
      static_cast<const W*>(b), y, sy, static_cast<T*>(ro), sro, n, eps);
  return cudaGetLastError();
}

// 16-byte vectors when n, every row start and every base pointer allow them; single elements otherwise.
template <typename T, typename W, bool RMS>
cudaError_t dispatch_vec(const void* x, int64_t sx, const void* r, int64_t sr, const void* w, const void* b, void* y,
                         int64_t sy, void* ro, int64_t sro, int64_t rows, int n, float eps, int y_size,
                         cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  bool vec = n % kVec == 0 && aligned16(x) && aligned16(y) && (sx * sizeof(T)) % 16 == 0 &&
             (sy * y_size) % 16 == 0;
  if (r != nullptr) vec = vec && aligned16(r) && aligned16(ro) && (sr * sizeof(T)) % 16 == 0 &&
                          (sro * sizeof(T)) % 16 == 0;
  if (vec) return launch_norm<T, W, RMS, kVec>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, n, eps, stream);
  return launch_norm<T, W, RMS, 1>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, n, eps, stream);
}

int dtype_size(int dt) { return dt == FASTENC_F32 ? 4 : 2; }

template <bool RMS, typename T>
cudaError_t dispatch_w(const void* x, int64_t sx, const void* r, int64_t sr, const void* w, const void* b, void* y,
                       int64_t sy, void* ro, int64_t sro, int64_t rows, int n, float eps, int x_dtype, int w_dtype,
                       cudaStream_t stream) {
  const int y_size = (RMS && w_dtype != FASTENC_F32) ? dtype_size(w_dtype) : dtype_size(x_dtype);
  switch (w_dtype) {
    case FASTENC_F32:
      return dispatch_vec<T, float, RMS>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, n, eps, y_size, stream);
    case FASTENC_F16:
      return dispatch_vec<T, __half, RMS>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, n, eps, y_size, stream);
    case FASTENC_BF16:
      return dispatch_vec<T, __nv_bfloat16, RMS>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, n, eps, y_size, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

template <bool RMS>
cudaError_t dispatch(const void* x, int64_t sx, const void* r, int64_t sr, const void* w, const void* b, void* y,
                     int64_t sy, void* ro, int64_t sro, int64_t rows, int64_t n, float eps, int x_dtype, int w_dtype,
                     cudaStream_t stream) {
  if (n <= 0 || n > FASTENC_NORM_MAX_N || rows < 0 || rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if ((r == nullptr) != (ro == nullptr)) return cudaErrorInvalidValue;
  const int ni = static_cast<int>(n);
  switch (x_dtype) {
    case FASTENC_F32:
      return dispatch_w<RMS, float>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, ni, eps, x_dtype, w_dtype, stream);
    case FASTENC_F16:
      return dispatch_w<RMS, __half>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, ni, eps, x_dtype, w_dtype, stream);
    case FASTENC_BF16:
      return dispatch_w<RMS, __nv_bfloat16>(x, sx, r, sr, w, b, y, sy, ro, sro, rows, ni, eps, x_dtype, w_dtype,
                                            stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace fastenc

extern "C" cudaError_t fastenc_layer_norm_fwd(const void* x, int64_t stride_x, const void* residual, int64_t stride_r,
                                              const void* weight, const void* bias, void* y, int64_t stride_y,
                                              void* res_out, int64_t stride_res_out, int64_t rows, int64_t n,
                                              float eps, int x_dtype, int w_dtype, cudaStream_t stream) {
  return fastenc::dispatch<false>(x, stride_x, residual, stride_r, weight, bias, y, stride_y, res_out, stride_res_out,
                                  rows, n, eps, x_dtype, w_dtype, stream);
}

extern "C" cudaError_t fastenc_rms_norm_fwd(const void* x, int64_t stride_x, const void* residual, int64_t stride_r,
                                            const void* weight, void* y, int64_t stride_y, void* res_out,
                                            int64_t stride_res_out, int64_t rows, int64_t n, float eps, int x_dtype,
                                            int w_dtype, cudaStream_t stream) {
  return fastenc::dispatch<true>(x, stride_x, residual, stride_r, weight, nullptr, y, stride_y, res_out,
                                 stride_res_out, rows, n, eps, x_dtype, w_dtype, stream);
}
