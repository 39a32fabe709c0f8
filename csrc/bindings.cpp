// The only file of csrc/ with torch headers: checks tensors (TORCH_CHECK, messages show expected vs got), allocates
// outputs and calls the plain-CUDA launchers of fastenc_cuda.h on the current stream. Registers the ops as
// torch.ops.fastenc_cuda.* (schemas here, CUDA implementations here, fake implementations in fastenc/_cuda.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fastenc_cuda.h"

namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return FASTENC_F32;
    case at::kHalf: return FASTENC_F16;
    case at::kBFloat16: return FASTENC_BF16;
    default: TORCH_CHECK(false, "fastenc_cuda: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_cuda_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastenc_cuda: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, "fastenc_cuda: ", name, " must be 2-D (rows, N), got shape ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || t.size(1) <= 1, "fastenc_cuda: ", name,
              " must have unit column stride, got strides ", t.strides());
}

void check_vector(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "fastenc_cuda: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "fastenc_cuda: ", name, " must have shape (", x.size(1),
              ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastenc_cuda: ", name, " must be contiguous");
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "fastenc_cuda::", op, " failed: ", cudaGetErrorString(err));
}

void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& x) {
  if (!residual.has_value()) return;
  check_cuda_rows(*residual, "residual");
  TORCH_CHECK(residual->sizes() == x.sizes(), "fastenc_cuda: residual must have x's shape ", x.sizes(), ", got ",
              residual->sizes());
  TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "fastenc_cuda: residual has dtype ",
              residual->scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(residual->device() == x.device(), "fastenc_cuda: residual is on ", residual->device(),
              " but x is on ", x.device());
}

// (y, res_out); res_out is an empty (0,) tensor when there is no residual (schemas cannot return None).
std::tuple<at::Tensor, at::Tensor> norm_impl(bool rms, const at::Tensor& x, const at::Tensor& weight,
                                             const std::optional<at::Tensor>& bias, double eps,
                                             const std::optional<at::Tensor>& residual) {
  const char* op = rms ? "rms_norm" : "layer_norm";
  check_cuda_rows(x, "x");
  const int xd = dtype_code(x, "x");
  const int wd = dtype_code(weight, "weight");
  check_vector(weight, "weight", x);
  if (bias.has_value()) {
    check_vector(*bias, "bias", x);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "fastenc_cuda: bias has dtype ", bias->scalar_type(),
                " but weight has ", weight.scalar_type(), "; they must match");
  }
  check_residual(residual, x);
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(n >= 1 && n <= FASTENC_NORM_MAX_N, "fastenc_cuda::", op, ": N must be in [1, ", FASTENC_NORM_MAX_N,
              "], got ", n);
  TORCH_CHECK(eps >= 0.0, "fastenc_cuda::", op, ": eps must be >= 0, got ", eps);
  const auto y_dtype = (rms && wd != FASTENC_F32) ? weight.scalar_type() : x.scalar_type();
  at::Tensor y = at::empty({rows, n}, x.options().dtype(y_dtype));
  at::Tensor res_out = residual.has_value() ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  if (rows == 0) return {y, res_out};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const void* r = residual.has_value() ? residual->data_ptr() : nullptr;
  const int64_t sr = residual.has_value() ? residual->stride(0) : 0;
  void* ro = residual.has_value() ? res_out.data_ptr() : nullptr;
  const int64_t sro = residual.has_value() ? res_out.stride(0) : 0;
  cudaError_t err;
  if (rms) {
    err = fastenc_rms_norm_fwd(x.data_ptr(), x.stride(0), r, sr, weight.data_ptr(), y.data_ptr(), y.stride(0), ro, sro,
                               rows, n, static_cast<float>(eps), xd, wd, stream);
  } else {
    err = fastenc_layer_norm_fwd(x.data_ptr(), x.stride(0), r, sr, weight.data_ptr(),
                                 bias.has_value() ? bias->data_ptr() : nullptr, y.data_ptr(), y.stride(0), ro, sro,
                                 rows, n, static_cast<float>(eps), xd, wd, stream);
  }
  check_cuda(err, op);
  return {y, res_out};
}

// The schemas are those of the Triton ops (fastenc::layer_norm / rms_norm): [y] or [y, x + residual].
std::vector<at::Tensor> norm_outputs(const std::tuple<at::Tensor, at::Tensor>& y_s, bool has_residual) {
  if (has_residual) return {std::get<0>(y_s), std::get<1>(y_s)};
  return {std::get<0>(y_s)};
}

std::vector<at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   double eps) {
  return norm_outputs(norm_impl(false, x, weight, bias, eps, residual), residual.has_value());
}

std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& residual, double eps) {
  return norm_outputs(norm_impl(true, x, weight, std::nullopt, eps, residual), residual.has_value());
}

int activation_code(const std::string& activation) {
  if (activation == "quick_gelu") return FASTENC_QUICK_GELU;
  if (activation == "gelu") return FASTENC_GELU;
  if (activation == "gelu_tanh") return FASTENC_GELU_TANH;
  if (activation == "relu") return FASTENC_RELU;
  TORCH_CHECK(false, "fastenc_cuda: activation must be one of quick_gelu, gelu, gelu_tanh, relu, got '", activation,
              "'");
  return -1;
}

at::Tensor bias_activation(const at::Tensor& x, const std::optional<at::Tensor>& bias, const std::string& activation) {
  check_cuda_rows(x, "x");
  const int xd = dtype_code(x, "x");
  const int act = activation_code(activation);
  int bd = xd;
  if (bias.has_value()) {
    check_vector(*bias, "bias", x);
    bd = dtype_code(*bias, "bias");
    TORCH_CHECK(bd == xd || bd == FASTENC_F32, "fastenc_cuda::bias_activation: bias must have x's dtype ",
                x.scalar_type(), " or float32, got ", bias->scalar_type());
  }
  const int64_t rows = x.size(0), n = x.size(1);
  at::Tensor y = at::empty({rows, n}, x.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(fastenc_bias_activation_fwd(x.data_ptr(), x.stride(0), bias.has_value() ? bias->data_ptr() : nullptr, bd,
                                         y.data_ptr(), rows, n, act, xd, c10::cuda::getCurrentCUDAStream().stream()),
             "bias_activation");
  return y;
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& activation) {
  check_cuda_rows(gate, "gate");
  check_cuda_rows(up, "up");
  const int dt = dtype_code(gate, "gate");
  const int act = activation_code(activation);
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type() && gate.device() == up.device(),
              "fastenc_cuda::gated_activation: gate and up must match in shape, dtype and device, got ", gate.sizes(),
              " ", gate.scalar_type(), " ", gate.device(), " and ", up.sizes(), " ", up.scalar_type(), " ",
              up.device());
  const int64_t rows = gate.size(0), n = gate.size(1);
  at::Tensor y = at::empty({rows, n}, gate.options());
  if (y.numel() == 0) return y;
  const c10::cuda::CUDAGuard guard(gate.device());
  check_cuda(fastenc_gated_activation_fwd(gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), y.data_ptr(),
                                          rows, n, act, dt, c10::cuda::getCurrentCUDAStream().stream()),
             "gated_activation");
  return y;
}

// (B, H, Sq, D) output, a view of a (B, Sq, H, D)-contiguous buffer, as the Triton kernel returns.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& rel_bias_table, const std::optional<at::Tensor>& rel_bias_lut,
                     bool causal, double scale) {
  TORCH_CHECK(!bias.has_value() && !rel_bias_table.has_value() && !rel_bias_lut.has_value(),
              "fastenc_cuda::attention: additive and relative-position biases are not supported by the CUDA kernel "
              "(fastenc.ops.attention runs them on Triton)");
  TORCH_CHECK(q.is_cuda(), "fastenc_cuda::attention: q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.dim() == 4, "fastenc_cuda::attention: q must be (B, H, Sq, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fastenc_cuda::attention: q must be float16 or bfloat16, got ", q.scalar_type());
  const int64_t b = q.size(0), h = q.size(1), sq = q.size(2), d = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == b && k.size(1) == h && k.size(3) == d && v.sizes() == k.sizes(),
              "fastenc_cuda::attention: k and v must be (B=", b, ", H=", h, ", Sk, D=", d, "), got k ", k.sizes(),
              ", v ", v.sizes());
  const int64_t sk = k.size(2);
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "fastenc_cuda::attention: k and v must have q's dtype ", q.scalar_type(), " and device ", q.device(),
                ", got ", t->scalar_type(), " on ", t->device());
  }
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->stride(3) == 1 || d == 1, "fastenc_cuda::attention: q, k, v need unit stride on D, got strides ",
                t->strides());
  }
  TORCH_CHECK(sk <= FASTENC_ATTN_MAX_SEQLEN_K, "fastenc_cuda::attention: Sk must be <= ", FASTENC_ATTN_MAX_SEQLEN_K,
              " (K and V of one head live in shared memory), got ", sk);
  TORCH_CHECK(d >= 1 && d <= FASTENC_ATTN_MAX_HEAD_DIM, "fastenc_cuda::attention: head dim must be in [1, ",
              FASTENC_ATTN_MAX_HEAD_DIM, "], got ", d);
  TORCH_CHECK(b <= 65535 && h <= 65535, "fastenc_cuda::attention: B and H must be <= 65535, got ", b, ", ", h);
  TORCH_CHECK(sq <= 0x7fffffff, "fastenc_cuda::attention: Sq too large: ", sq);
  TORCH_CHECK(!causal || sq == sk, "fastenc_cuda::attention: causal attention needs Sq == Sk, got ", sq, ", ", sk);
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "fastenc_cuda::attention: key_padding_mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == b && m.size(1) == sk,
                "fastenc_cuda::attention: key_padding_mask must have shape (B=", b, ", Sk=", sk, "), got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), "fastenc_cuda::attention: key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
  }
  at::Tensor out = at::empty({b, sq, h, d}, q.options()).transpose(1, 2);
  if (out.numel() == 0) return out;
  FastencAttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.out = out.data_ptr();
  a.key_padding_mask = key_padding_mask.has_value() ? static_cast<const uint8_t*>(key_padding_mask->data_ptr())
                                                    : nullptr;
  a.q_stride_b = q.stride(0), a.q_stride_h = q.stride(1), a.q_stride_s = q.stride(2);
  a.k_stride_b = k.stride(0), a.k_stride_h = k.stride(1), a.k_stride_s = k.stride(2);
  a.v_stride_b = v.stride(0), a.v_stride_h = v.stride(1), a.v_stride_s = v.stride(2);
  a.o_stride_b = out.stride(0), a.o_stride_h = out.stride(1), a.o_stride_s = out.stride(2);
  a.kpm_stride_b = key_padding_mask.has_value() ? key_padding_mask->stride(0) : 0;
  a.kpm_stride_s = key_padding_mask.has_value() ? key_padding_mask->stride(1) : 0;
  a.batch = static_cast<int>(b), a.heads = static_cast<int>(h);
  a.seqlen_q = static_cast<int>(sq), a.seqlen_k = static_cast<int>(sk), a.head_dim = static_cast<int>(d);
  a.scale = static_cast<float>(scale);
  a.causal = causal ? 1 : 0;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = q.scalar_type() == at::kHalf ? fastenc_attention_fwd_f16(&a, stream)
                                                       : fastenc_attention_fwd_bf16(&a, stream);
  check_cuda(err, "attention");
  return out;
}

}  // namespace

TORCH_LIBRARY(fastenc_cuda, m) {
  // One schema per op: the same as torch.ops.fastenc.<op> (fastenc/ops/_library.py; tests/test_cuda_build.py).
  m.def("layer_norm(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, float eps) -> Tensor[]");
  m.def("rms_norm(Tensor x, Tensor weight, Tensor? residual, float eps) -> Tensor[]");
  m.def("bias_activation(Tensor x, Tensor? bias, str activation) -> Tensor");
  m.def("gated_activation(Tensor gate, Tensor up, str activation) -> Tensor");
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? bias, Tensor? rel_bias_table, "
      "Tensor? rel_bias_lut, bool causal, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastenc_cuda, CUDA, m) {
  m.impl("layer_norm", &layer_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("bias_activation", &bias_activation);
  m.impl("gated_activation", &gated_activation);
  m.impl("attention", &attention);
}

// `import fastenc._C` (the setup.py build) loads this library, which registers the ops above; the module is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
