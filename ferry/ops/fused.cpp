// Fused elementwise ops of the decoder layer. Each replaces 3-6 torch ops (and their dispatch and thread
// barriers) with one pass. They round to the activation dtype at the same points as the unfused torch
// sequence, so results are bit-identical to it; build with -ffp-contract=off to keep it so.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

namespace {

template <typename T>
inline T rnd(float x) { return static_cast<T>(x); }  // float -> T with T's rounding (bf16: round-to-nearest-even)

constexpr int64_t kGrain = 16;  // rows per task: small batches stay on one thread (no barrier)

// residual <- residual + x (rounded to T); out <- weight * T(rms_norm(residual))
template <typename T>
void add_rms_norm_impl(T* x, T* residual, const T* w, T* out, int64_t rows, int64_t D, float eps, bool add) {
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      T* res = residual + r * D;
      const T* xr = x + r * D;
      float ss = 0.f;
      for (int64_t i = 0; i < D; ++i) {
        if (add) res[i] = rnd<T>(static_cast<float>(res[i]) + static_cast<float>(xr[i]));
        const float v = static_cast<float>(res[i]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      T* o = out + r * D;
      for (int64_t i = 0; i < D; ++i) {
        const T n = rnd<T>(static_cast<float>(res[i]) * inv);
        o[i] = rnd<T>(static_cast<float>(w[i]) * static_cast<float>(n));
      }
    }
  });
}

// gate_up [rows, 2I] -> out [rows, I] = T(silu(gate)) * up
template <typename T>
void silu_mul_impl(const T* gu, T* out, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* g = gu + r * 2 * I;
      const T* u = g + I;
      T* o = out + r * I;
      for (int64_t i = 0; i < I; ++i) {
        const float gv = static_cast<float>(g[i]);
        const T s = rnd<T>(gv / (1.f + std::exp(-gv)));
        o[i] = rnd<T>(static_cast<float>(s) * static_cast<float>(u[i]));
      }
    }
  });
}

// x [rows, heads, Dh] in place: x*cos + rotate_half(x)*sin, cos/sin [rows, Dh] (already in T)
template <typename T>
void rotary_impl(T* x, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t Dh, int64_t row_stride) {
  const int64_t half = Dh / 2;
  at::parallel_for(0, rows, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const T* c = cos + r * Dh;
      const T* s = sin + r * Dh;
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + r * row_stride + h * Dh;
        for (int64_t i = 0; i < half; ++i) {
          const float a = static_cast<float>(v[i]), bb = static_cast<float>(v[i + half]);
          const T lo1 = rnd<T>(a * static_cast<float>(c[i])), lo2 = rnd<T>(-bb * static_cast<float>(s[i]));
          const T hi1 = rnd<T>(bb * static_cast<float>(c[i + half])), hi2 = rnd<T>(a * static_cast<float>(s[i + half]));
          v[i] = rnd<T>(static_cast<float>(lo1) + static_cast<float>(lo2));
          v[i + half] = rnd<T>(static_cast<float>(hi1) + static_cast<float>(hi2));
        }
      }
    }
  });
}

}  // namespace

#define DISPATCH(t, NAME, ...)                                                       \
  if ((t).scalar_type() == at::kFloat) { using T = float; __VA_ARGS__; }              \
  else if ((t).scalar_type() == at::kBFloat16) { using T = at::BFloat16; __VA_ARGS__; } \
  else TORCH_CHECK(false, NAME ": dtype must be float32 or bfloat16")

// Returns the normed rows; residual is updated in place (when x is given).
torch::Tensor add_rms_norm(c10::optional<torch::Tensor> x, torch::Tensor residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous(), "add_rms_norm: contiguous inputs");
  const int64_t D = residual.size(-1), rows = residual.numel() / D;
  auto out = torch::empty_like(residual);
  torch::Tensor xc = x.has_value() ? x->contiguous() : residual;
  DISPATCH(residual, "add_rms_norm",
           add_rms_norm_impl<T>(xc.data_ptr<T>(), residual.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(), rows,
                                D, static_cast<float>(eps), x.has_value()));
  return out;
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous(), "silu_mul: contiguous input");
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = I;
  auto out = torch::empty(sizes, gate_up.options());
  DISPATCH(gate_up, "silu_mul", silu_mul_impl<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), rows, I));
  return out;
}

// x: [rows, heads, Dh] view whose rows may be strided (a slice of the fused qkv output).
void rotary_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2), "rotary_: x must be [rows, heads, Dh] with dense heads");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == x.scalar_type(), "rotary_: cos/sin");
  DISPATCH(x, "rotary_", rotary_impl<T>(x.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(), x.size(0), x.size(1),
                                         x.size(2), x.stride(0)));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up");
  m.def("rotary_", &rotary_, "rotary embedding in place");
}
