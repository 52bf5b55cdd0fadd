// Decode attention straight from an int8 paged KV cache (kv policy int8): one query token per sequence.
// Same walk as paged_attention.cpp (work split over (sequence, kv head), the G query heads of a kv head
// together, one pass over K and one over V, read in place through the block table), but each K/V row is int8
// with a float32 scale per (token, kv head): score = (q . k_int8) * k_scale, out += p * v_scale * v_int8.
// Reading a quarter of float32's bytes (half of bfloat16's) is what makes int8 decode cheaper, not only smaller.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline float dot_i8(const float* __restrict q, const int8_t* __restrict k, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

inline void axpy_i8(float a, const int8_t* __restrict v, float* __restrict out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += a * static_cast<float>(v[i]);
}

}  // namespace

// q: [B, H, Dh] float32; k_cache, v_cache: [num_blocks, block_size, K, Dh] int8; k_scale, v_scale:
// [num_blocks, block_size, K] float32; block_tables: [B, max_blocks] int64; ctx_lens: [B] int64.
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                          torch::Tensor k_scale, torch::Tensor v_scale, torch::Tensor block_tables,
                                          torch::Tensor ctx_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3, "q must be contiguous float32 [B, H, Dh]");
  TORCH_CHECK(k_cache.dtype() == torch::kInt8 && v_cache.dtype() == torch::kInt8, "caches must be int8");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_scale.is_contiguous() && v_scale.is_contiguous(),
              "caches and scales must be contiguous");
  TORCH_CHECK(k_scale.dtype() == torch::kFloat32 && v_scale.dtype() == torch::kFloat32, "scales must be float32");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64, "tables and lengths must be int64");
  const int64_t B = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t bs = k_cache.size(1), K = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh && H % K == 0, "head dims do not match");
  auto bt = block_tables.contiguous();
  auto lens = ctx_lens.contiguous();
  auto out = torch::empty({B, H, Dh}, q.options());
  const float* qp = q.data_ptr<float>();
  const int8_t* kc = k_cache.data_ptr<int8_t>();
  const int8_t* vc = v_cache.data_ptr<int8_t>();
  const float* ks = k_scale.data_ptr<float>();
  const float* vs = v_scale.data_ptr<float>();
  const int64_t* tables = bt.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t max_blocks = bt.size(1), G = H / K, row = K * Dh;
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, kh = task % K;
      const int64_t len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = tables + b * max_blocks;
      scores.assign(G * n, 0.f);
      const float* qb = qp + (b * H + kh * G) * Dh;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const int64_t slot = table[pos / bs] * bs + pos % bs;  // token row in the cache
        const int8_t* kp = kc + slot * row + kh * Dh;
        const float s = ks[slot * K + kh] * sc;
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = dot_i8(qb + g * Dh, kp, Dh) * s;
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
      float* ob = op + (b * H + kh * G) * Dh;
      std::fill(ob, ob + G * Dh, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t pos = first + j;
        const int64_t slot = table[pos / bs] * bs + pos % bs;
        const int8_t* vp = vc + slot * row + kh * Dh;
        const float s = vs[slot * K + kh];
        for (int64_t g = 0; g < G; ++g) axpy_i8(scores[g * n + j] * s, vp, ob + g * Dh, Dh);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "decode attention over an int8 paged KV cache");
}
