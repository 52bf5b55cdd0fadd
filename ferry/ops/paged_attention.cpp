// Decode attention straight from the paged KV cache (one query token per sequence).
// Reads each sequence's K and V blocks in place through its block table: no gather copy, no layout
// change, one pass over K (scores) and one over V. Work is split over (sequence, kv head) pairs; the
// G = H / K query heads sharing a kv head are handled together so each K/V row is loaded once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

template <typename T>
inline float dot(const float* __restrict q, const T* __restrict k, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += q[i] * to_f32(k[i]);
  return acc;
}

template <typename T>
inline void axpy(float a, const T* __restrict v, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += a * to_f32(v[i]);
}

template <typename T>
void decode_attention_impl(const float* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                           const int64_t* ctx_lens, float* out, int64_t B, int64_t H, int64_t K, int64_t Dh,
                           int64_t block_size, int64_t max_blocks, int64_t window, float scale) {
  const int64_t G = H / K;
  const int64_t row = K * Dh;             // elements per token in a block
  const int64_t block_stride = block_size * row;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, kh = task % K;
      const int64_t len = ctx_lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = block_tables + b * max_blocks;
      scores.assign(G * n, 0.f);
      const float* qb = q + (b * H + kh * G) * Dh;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const T* kp = k_cache + table[pos / block_size] * block_stride + (pos % block_size) * row + kh * Dh;
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot(qb + g * Dh, kp, Dh) * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      }
      float* ob = out + (b * H + kh * G) * Dh;
      std::fill(ob, ob + G * Dh, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const T* vp = v_cache + table[pos / block_size] * block_stride + (pos % block_size) * row + kh * Dh;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * n + j], vp, ob + g * Dh, Dh);
      }
    }
  });
}

}  // namespace

// q: [B, H, Dh] float32; k_cache, v_cache: [num_blocks, block_size, K, Dh] float32 or bfloat16;
// block_tables: [B, max_blocks] int64; ctx_lens: [B] int64 (keys 0..len-1 are visible, minus the window).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, int64_t window,
                                     double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3, "q must be contiguous float32 [B, H, Dh]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches must be contiguous [N, bs, K, Dh]");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64, "tables and lengths must be int64");
  const auto B = q.size(0), H = q.size(1), Dh = q.size(2);
  const auto bs = k_cache.size(1), K = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh && H % K == 0, "head dims do not match");
  auto bt = block_tables.contiguous();
  auto lens = ctx_lens.contiguous();
  auto out = torch::empty({B, H, Dh}, q.options());
  if (k_cache.dtype() == torch::kFloat32) {
    decode_attention_impl<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                 bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, Dh,
                                 bs, bt.size(1), window, static_cast<float>(scale));
  } else if (k_cache.dtype() == torch::kBFloat16) {
    decode_attention_impl<at::BFloat16>(q.data_ptr<float>(), k_cache.data_ptr<at::BFloat16>(),
                                        v_cache.data_ptr<at::BFloat16>(), bt.data_ptr<int64_t>(),
                                        lens.data_ptr<int64_t>(), out.data_ptr<float>(), B, H, K, Dh, bs, bt.size(1),
                                        window, static_cast<float>(scale));
  } else {
    TORCH_CHECK(false, "KV cache dtype must be float32 or bfloat16");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
}
