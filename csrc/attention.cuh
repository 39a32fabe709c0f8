// Short-sequence attention forward on tensor cores (nvcuda::wmma 16x16x16, fp16/bf16 operands, fp32 accumulate),
// for text towers: CLIP text (Sk = 77), SigLIP text (Sk = 64). Instantiated per dtype by attention_{f16,bf16}.cu.
//
// Math, per batch b, head h, query row i (fp32):
//     t_ij = scale * log2(e) * q_i . k_j, and -inf where key j >= Sk, key_padding_mask[b, j] == 0 or (causal) j > i
//     p_ij = exp2(t_ij - max_j t_ij),  o_i = (sum_j p_ij v_j) / (sum_j p_ij),  o_i = 0 when every key is masked
// NaN / inf in q, k or v at a key row i attends makes o_i NaN / inf (as SDPA); masks are selects, so a NaN score at
// a masked key does not leak.
// Softmax is exact (not online): the whole key range of a row fits in shared memory (Sk <= 128).
//
// Launch: one CTA per (query tile, head, batch), grid (ceil(Sq / (16 WARPS)), H, B); WARPS warps (1..8) each own
// 16 query rows, so a CTA covers 16 * WARPS rows and for Sq <= 128 one CTA holds a whole (batch, head). The CTA
// copies K, V (all keys, zero-padded to a multiple of 16 rows and DP columns) and its Q rows into shared memory;
// each warp then
//   1. S = Q K^T for its 16 rows: DP/16 x (Sk/16) wmma tiles, stored as fp32 to its shared S buffer;
//   2. softmax per row (one row at a time, lanes across keys), p rounded to the input dtype into its P buffer
//      (as FlashAttention-2 does before the P V product), 1 / rowsum kept in fp32;
//   3. O = P V with DP/16 fp32 accumulator fragments in registers, staged through the S buffer and written out
//      scaled by 1 / rowsum.
// DP is the head dim padded to 64, 80 or 128 (template), so D = 64 / 80 / 128 need no padding.
// Causal: a CTA loads only the keys up to its last query row, and each warp stops at its own last row.
#pragma once

#include <mma.h>

#include "common.cuh"
#include "fastenc_cuda.h"

namespace fastenc {
namespace attn {

constexpr int kMaxWarps = 8;
constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

// Shared memory layout of one CTA, in bytes (every buffer starts 128-byte aligned; wmma needs 32).
struct SmemLayout {
  int ldh;   // row stride (elements) of the K, V, Q buffers: DP + 8 (16-byte multiple, staggers banks)
  int lds;   // row stride (floats) of a warp's S / O staging buffer
  int ldp;   // row stride (elements) of a warp's P buffer
  size_t k, v, q, s, p, kbias, inv, total;

  __host__ __device__ SmemLayout(int dp, int skp, int warps, int elem_size) {
    ldh = dp + 8;
    lds = (skp > dp ? skp : dp) + 4;
    ldp = skp + 8;
    size_t off = 0;
    auto take = [&off](size_t bytes) {
      const size_t at = off;
      off += (bytes + 127) / 128 * 128;
      return at;
    };
    k = take(static_cast<size_t>(skp) * ldh * elem_size);
    v = take(static_cast<size_t>(skp) * ldh * elem_size);
    q = take(static_cast<size_t>(16 * warps) * ldh * elem_size);
    s = take(static_cast<size_t>(16 * warps) * lds * sizeof(float));
    p = take(static_cast<size_t>(16 * warps) * ldp * elem_size);
    kbias = take(static_cast<size_t>(skp) * sizeof(float));
    inv = take(static_cast<size_t>(16 * warps) * sizeof(float));
    total = off;
  }
};

// Copy rows [0, nrows_valid) x cols [0, d) of a strided (rows, d) matrix into a zero-padded (nrows, dp) buffer.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t stride, int nrows, int nrows_valid,
                                          int d, int dp, bool vec8) {
  if (vec8) {  // d % 8 == 0 and 16-byte aligned rows: 8 elements per load
    const int chunks = dp / 8;
    for (int idx = threadIdx.x; idx < nrows * chunks; idx += blockDim.x) {
      const int r = idx / chunks;
      const int c = (idx - r * chunks) * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows_valid && c < d) val = *reinterpret_cast<const uint4*>(src + r * stride + c);
      *reinterpret_cast<uint4*>(dst + r * ld + c) = val;
    }
  } else {
    const T zero = from_float<T>(0.0f);
    for (int idx = threadIdx.x; idx < nrows * dp; idx += blockDim.x) {
      const int r = idx / dp;
      const int c = idx - r * dp;
      dst[r * ld + c] = (r < nrows_valid && c < d) ? src[r * stride + c] : zero;
    }
  }
}

template <typename T, int DP, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) attention_short_kernel(FastencAttnArgs a, int skp, bool vec8) {
  using namespace nvcuda;
  constexpr int kDT = DP / 16;  // head-dim tiles
  const SmemLayout L(DP, skp, WARPS, sizeof(T));
  extern __shared__ __align__(128) unsigned char smem[];
  T* ks = reinterpret_cast<T*>(smem + L.k);
  T* vs = reinterpret_cast<T*>(smem + L.v);
  T* qs = reinterpret_cast<T*>(smem + L.q);
  float* kbias = reinterpret_cast<float*>(smem + L.kbias);
  float* inv = reinterpret_cast<float*>(smem + L.inv);

  const int q0 = blockIdx.x * 16 * WARPS;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int sq = a.seqlen_q, sk = a.seqlen_k, d = a.head_dim;
  // keys this CTA can see: causal rows stop at their own index
  int kend = sk;
  if (a.causal) kend = min(sk, q0 + 16 * WARPS);
  const int kpad = round_up(kend, 16);  // <= skp
  const int qrows = min(16 * WARPS, sq - q0);

  const T* qg = static_cast<const T*>(a.q) + b * a.q_stride_b + h * a.q_stride_h + q0 * a.q_stride_s;
  const T* kg = static_cast<const T*>(a.k) + b * a.k_stride_b + h * a.k_stride_h;
  const T* vg = static_cast<const T*>(a.v) + b * a.v_stride_b + h * a.v_stride_h;
  load_tile(ks, L.ldh, kg, a.k_stride_s, kpad, kend, d, DP, vec8);
  load_tile(vs, L.ldh, vg, a.v_stride_s, kpad, kend, d, DP, vec8);
  load_tile(qs, L.ldh, qg, a.q_stride_s, 16 * WARPS, qrows, d, DP, vec8);
  for (int j = threadIdx.x; j < kpad; j += blockDim.x) {
    bool keep = j < kend;
    if (keep && a.key_padding_mask != nullptr) keep = a.key_padding_mask[b * a.kpm_stride_b + j * a.kpm_stride_s] != 0;
    kbias[j] = keep ? 0.0f : -INFINITY;
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r0 = warp * 16;  // first row of this warp within the CTA
  const int i0 = q0 + r0;    // its global query index
  if (i0 >= sq) return;      // no barrier follows: idle warps may leave
  const int wkend = a.causal ? min(kend, i0 + 16) : kend;
  const int nkt = (wkend + 15) / 16;  // key tiles this warp needs
  float* sw = reinterpret_cast<float*>(smem + L.s) + r0 * L.lds;
  T* pw = reinterpret_cast<T*>(smem + L.p) + r0 * L.ldp;

  // 1. S = Q K^T (16 x 16 * nkt), fp32
  {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qa[kDT];
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) wmma::load_matrix_sync(qa[dt], qs + r0 * L.ldh + dt * 16, L.ldh);
    for (int kt = 0; kt < nkt; ++kt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kb;  // K row-major (n, d) == K^T col-major
        wmma::load_matrix_sync(kb, ks + kt * 16 * L.ldh + dt * 16, L.ldh);
        wmma::mma_sync(acc, qa[dt], kb, acc);
      }
      wmma::store_matrix_sync(sw + kt * 16, acc, L.lds, wmma::mem_row_major);
    }
  }
  __syncwarp();

  // 2. softmax, one row at a time; each lane holds keys lane, lane + 32, lane + 64, lane + 96
  const float qk_scale = a.scale * kLog2e;
  const int ncols = nkt * 16;
  for (int r = 0; r < 16; ++r) {
    const int i = i0 + r;
    float t[4];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = lane + 32 * c;
      t[c] = -INFINITY;  // masked by select, not by adding -inf: a NaN / +inf score at a masked key must not leak
      if (j < ncols && !(a.causal && j > i) && kbias[j] == 0.0f) t[c] = sw[r * L.lds + j] * qk_scale;
      m = fmaxf(m, t[c]);  // fmaxf drops NaN: m is the max of the non-NaN scores, NaN scores still give p = NaN below
    }
    m = warp_max(m);
    float l = 0.0f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int j = lane + 32 * c;
      // masked keys (t = -inf) give 0, also when m = -inf; NaN and +inf scores give NaN (exp2(inf - inf)), as SDPA
      const float p = t[c] == -INFINITY ? 0.0f : exp2f(t[c] - m);
      l += p;
      if (j < ncols) pw[r * L.ldp + j] = from_float<T>(p);
    }
    l = warp_sum(l);
    // l == 0 exactly when every key is masked: inv = 0 marks the row, which is written as 0 below. A NaN l (NaN or
    // +inf score) stays NaN; `l > 0 ? 1 / l : 0` would turn it into a finite 0 row and hide an fp16 overflow.
    if (lane == 0) inv[r0 + r] = l == 0.0f ? 0.0f : 1.0f / l;
  }
  __syncwarp();

  // 3. O = P V, fp32 accumulators in registers
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[kDT];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) wmma::fill_fragment(o[dt], 0.0f);
  for (int kt = 0; kt < nkt; ++kt) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
    wmma::load_matrix_sync(pa, pw + kt * 16, L.ldp);
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::load_matrix_sync(vb, vs + kt * 16 * L.ldh + dt * 16, L.ldh);
      wmma::mma_sync(o[dt], pa, vb, o[dt]);
    }
  }
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) wmma::store_matrix_sync(sw + dt * 16, o[dt], L.lds, wmma::mem_row_major);
  __syncwarp();

  T* og = static_cast<T*>(a.out) + b * a.o_stride_b + h * a.o_stride_h;
  const int rows = min(16, sq - i0);
  for (int idx = lane; idx < rows * d; idx += 32) {
    const int r = idx / d;
    const int c = idx - r * d;
    const float w = inv[r0 + r];  // 0 only for a fully masked row (l <= Sk is finite): 0 even where P V is NaN
    og[static_cast<int64_t>(i0 + r) * a.o_stride_s + c] = from_float<T>(w == 0.0f ? 0.0f : sw[r * L.lds + c] * w);
  }
}

template <typename T, int DP, int WARPS>
cudaError_t launch_warps(const FastencAttnArgs& a, int skp, bool vec8, size_t smem, cudaStream_t stream) {
  auto kernel = attention_short_kernel<T, DP, WARPS>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((a.seqlen_q + 16 * WARPS - 1) / (16 * WARPS), a.heads, a.batch);
  kernel<<<grid, WARPS * 32, smem, stream>>>(a, skp, vec8);
  return cudaGetLastError();
}

template <typename T, int DP>
cudaError_t launch_dp(const FastencAttnArgs& a, cudaStream_t stream) {
  const int skp = round_up(a.seqlen_k, 16);
  int max_smem = 0;
  cudaError_t err = max_dynamic_smem(&max_smem);
  if (err != cudaSuccess) return err;
  // as many warps as the queries need (one CTA per (batch, head) when Sq <= 128), fewer if shared memory is short
  int warps = (a.seqlen_q + 15) / 16;
  warps = warps > kMaxWarps ? kMaxWarps : (warps < 1 ? 1 : warps);
  while (warps > 1 && SmemLayout(DP, skp, warps, sizeof(T)).total > static_cast<size_t>(max_smem)) --warps;
  const size_t smem = SmemLayout(DP, skp, warps, sizeof(T)).total;
  if (smem > static_cast<size_t>(max_smem)) return cudaErrorInvalidConfiguration;
  const int e = static_cast<int>(sizeof(T));
  const bool vec8 = a.head_dim % 8 == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) &&
                    (a.q_stride_s * e) % 16 == 0 && (a.q_stride_h * e) % 16 == 0 && (a.q_stride_b * e) % 16 == 0 &&
                    (a.k_stride_s * e) % 16 == 0 && (a.k_stride_h * e) % 16 == 0 && (a.k_stride_b * e) % 16 == 0 &&
                    (a.v_stride_s * e) % 16 == 0 && (a.v_stride_h * e) % 16 == 0 && (a.v_stride_b * e) % 16 == 0;
  switch (warps) {
    case 1: return launch_warps<T, DP, 1>(a, skp, vec8, smem, stream);
    case 2: return launch_warps<T, DP, 2>(a, skp, vec8, smem, stream);
    case 3: return launch_warps<T, DP, 3>(a, skp, vec8, smem, stream);
    case 4: return launch_warps<T, DP, 4>(a, skp, vec8, smem, stream);
    case 5: return launch_warps<T, DP, 5>(a, skp, vec8, smem, stream);
    case 6: return launch_warps<T, DP, 6>(a, skp, vec8, smem, stream);
    case 7: return launch_warps<T, DP, 7>(a, skp, vec8, smem, stream);
    default: return launch_warps<T, DP, 8>(a, skp, vec8, smem, stream);
  }
}

template <typename T>
cudaError_t launch(const FastencAttnArgs* a, cudaStream_t stream) {
  if (a == nullptr || a->batch < 0 || a->heads < 0 || a->seqlen_q < 0 || a->seqlen_k < 0) return cudaErrorInvalidValue;
  if (a->seqlen_k > FASTENC_ATTN_MAX_SEQLEN_K || a->head_dim < 1 || a->head_dim > FASTENC_ATTN_MAX_HEAD_DIM)
    return cudaErrorInvalidValue;
  if (a->batch > 65535 || a->heads > 65535) return cudaErrorInvalidValue;
  if (a->batch == 0 || a->heads == 0 || a->seqlen_q == 0) return cudaSuccess;
  if (a->head_dim <= 64) return launch_dp<T, 64>(*a, stream);
  if (a->head_dim <= 80) return launch_dp<T, 80>(*a, stream);
  return launch_dp<T, 128>(*a, stream);
}

}  // namespace attn
}  // namespace fastenc
