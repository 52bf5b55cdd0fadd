// Decode attention straight from the paged KV cache (one query token per sequence).
// Reads each sequence's K and V blocks in place through its block table: no gather copy, no layout
// change, one pass over K (scores) and one over V. Work is split over (sequence, kv head) pairs; the
// G = H / K query heads sharing a kv head are handled together so each K/V row is loaded once.
// The walk is one template over how a (token slot, kv head) row is stored: float32 or bfloat16 rows, or
// int8 rows with a float32 scale per (token, kv head) (kv policy int8; a quarter of float32's bytes read).
// Optionally (kv policy lazy) a token is visible only where its depth (layers holding its KV) exceeds the layer,
// and the attention probabilities are returned too, averaged over the G query heads of each kv head.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_f32(float x) { return x; }
inline float to_f32(int8_t x) { return static_cast<float>(x); }
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

// Rows stored as they are used: float32 or bfloat16.
template <typename T>
struct PlainRows {
  const T* k;
  const T* v;
  int64_t K, Dh;
  float score(const float* q, int64_t slot, int64_t kh) const { return dot(q, k + (slot * K + kh) * Dh, Dh); }
  void accumulate(float p, int64_t slot, int64_t kh, float* out) const { axpy(p, v + (slot * K + kh) * Dh, out, Dh); }
};

// int8 rows, each with a float32 scale: score = (q . k_int8) * k_scale, out += p * v_scale * v_int8.
struct Int8Rows {
  const int8_t* k;
  const int8_t* v;
  const float* k_scale;
  const float* v_scale;
  int64_t K, Dh;
  float score(const float* q, int64_t slot, int64_t kh) const {
    return dot(q, k + (slot * K + kh) * Dh, Dh) * k_scale[slot * K + kh];
  }
  void accumulate(float p, int64_t slot, int64_t kh, float* out) const {
    axpy(p * v_scale[slot * K + kh], v + (slot * K + kh) * Dh, out, Dh);
  }
};

// Which tokens a query sees and what is reported besides the output (kv policy lazy); empty: all, nothing.
struct Extras {
  const uint8_t* depth = nullptr;  // [num_blocks * block_size]: a token is visible where depth > layer
  int64_t layer = 0;
  float* probs = nullptr;  // [B, K, max_blocks * block_size]: attention per key, mean over the G heads (zeroed)
};

template <typename Rows>
void decode_attention_impl(const Rows& rows, const float* q, const int64_t* block_tables, const int64_t* ctx_lens,
                           float* out, int64_t B, int64_t H, int64_t block_size, int64_t max_blocks, int64_t window,
                           float scale, const Extras& ex = Extras()) {
  const int64_t K = rows.K, Dh = rows.Dh, G = H / K, C = max_blocks * block_size;
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / K, kh = task % K;
      const int64_t len = ctx_lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      const int64_t* table = block_tables + b * max_blocks;
      auto slot = [&](int64_t pos) { return table[pos / block_size] * block_size + pos % block_size; };
      scores.assign(G * n, 0.f);
      const float* qb = q + (b * H + kh * G) * Dh;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t s = slot(first + j);
        const bool visible = ex.depth == nullptr || ex.depth[s] > ex.layer;
        for (int64_t g = 0; g < G; ++g) scores[g * n + j] = visible ? rows.score(qb + g * Dh, s, kh) * scale : -INFINITY;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* s = scores.data() + g * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        if (mx == -INFINITY) { std::fill(s, s + n, 0.f); continue; }  // nothing visible: no attention
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - mx); sum += s[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      }
      float* ob = out + (b * H + kh * G) * Dh;
      std::fill(ob, ob + G * Dh, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        const int64_t s = slot(first + j);
        for (int64_t g = 0; g < G; ++g)
          if (scores[g * n + j] > 0.f) rows.accumulate(scores[g * n + j], s, kh, ob + g * Dh);
      }
      if (ex.probs != nullptr) {
        float* pb = ex.probs + (b * K + kh) * C + first;
        for (int64_t j = 0; j < n; ++j) {
          float p = 0.f;
          for (int64_t g = 0; g < G; ++g) p += scores[g * n + j];
          pb[j] = p / G;
        }
      }
    }
  });
}

// Checks shared by both entry points; returns the output tensor.
torch::Tensor check_and_alloc(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                              const torch::Tensor& block_tables, const torch::Tensor& ctx_lens) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && q.dim() == 3, "q must be contiguous float32 [B, H, Dh]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4, "caches must be contiguous [N, bs, K, Dh]");
  TORCH_CHECK(block_tables.dtype() == torch::kInt64 && ctx_lens.dtype() == torch::kInt64, "tables and lengths must be int64");
  TORCH_CHECK(k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0, "head dims do not match");
  return torch::empty_like(q);
}

template <typename Rows>
torch::Tensor run(const Rows& rows, const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& block_tables,
                  const torch::Tensor& ctx_lens, torch::Tensor out, int64_t window, double scale,
                  const Extras& ex = Extras()) {
  auto bt = block_tables.contiguous();
  auto lens = ctx_lens.contiguous();
  decode_attention_impl(rows, q.data_ptr<float>(), bt.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                        out.data_ptr<float>(), q.size(0), q.size(1), k_cache.size(1), bt.size(1), window,
                        static_cast<float>(scale), ex);
  return out;
}

}  // namespace

// q: [B, H, Dh] float32; k_cache, v_cache: [num_blocks, block_size, K, Dh] float32 or bfloat16;
// block_tables: [B, max_blocks] int64; ctx_lens: [B] int64 (keys 0..len-1 are visible, minus the window).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor ctx_lens, int64_t window,
                                     double scale) {
  auto out = check_and_alloc(q, k_cache, v_cache, block_tables, ctx_lens);
  const int64_t K = k_cache.size(2), Dh = q.size(2);
  if (k_cache.dtype() == torch::kFloat32) {
    PlainRows<float> rows{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), K, Dh};
    return run(rows, q, k_cache, block_tables, ctx_lens, out, window, scale);
  }
  TORCH_CHECK(k_cache.dtype() == torch::kBFloat16, "KV cache dtype must be float32 or bfloat16");
  PlainRows<at::BFloat16> rows{k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), K, Dh};
  return run(rows, q, k_cache, block_tables, ctx_lens, out, window, scale);
}

// As paged_decode_attention, a token visible only where depth [num_blocks, block_size] uint8 > layer; with
// want_probs also returns [B, K, max_blocks * block_size] attention per key position (mean over G), else empty.
std::vector<torch::Tensor> paged_decode_attention_depth(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                                        torch::Tensor block_tables, torch::Tensor ctx_lens,
                                                        torch::Tensor depth, int64_t layer, int64_t window,
                                                        double scale, bool want_probs) {
  auto out = check_and_alloc(q, k_cache, v_cache, block_tables, ctx_lens);
  TORCH_CHECK(depth.dtype() == torch::kUInt8 && depth.is_contiguous() && depth.numel() == k_cache.size(0) * k_cache.size(1),
              "depth must be contiguous uint8 [num_blocks, block_size]");
  const int64_t K = k_cache.size(2), Dh = q.size(2);
  auto probs = want_probs ? torch::zeros({q.size(0), K, block_tables.size(1) * k_cache.size(1)}, q.options())
                          : torch::empty({0}, q.options());
  Extras ex{depth.data_ptr<uint8_t>(), layer, want_probs ? probs.data_ptr<float>() : nullptr};
  if (k_cache.dtype() == torch::kFloat32) {
    PlainRows<float> rows{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), K, Dh};
    run(rows, q, k_cache, block_tables, ctx_lens, out, window, scale, ex);
  } else {
    TORCH_CHECK(k_cache.dtype() == torch::kBFloat16, "KV cache dtype must be float32 or bfloat16");
    PlainRows<at::BFloat16> rows{k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), K, Dh};
    run(rows, q, k_cache, block_tables, ctx_lens, out, window, scale, ex);
  }
  return {out, probs};
}

// As above with int8 caches and k_scale, v_scale: [num_blocks, block_size, K] float32.
torch::Tensor paged_decode_attention_int8(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                          torch::Tensor k_scale, torch::Tensor v_scale, torch::Tensor block_tables,
                                          torch::Tensor ctx_lens, int64_t window, double scale) {
  auto out = check_and_alloc(q, k_cache, v_cache, block_tables, ctx_lens);
  TORCH_CHECK(k_cache.dtype() == torch::kInt8 && v_cache.dtype() == torch::kInt8, "caches must be int8");
  TORCH_CHECK(k_scale.is_contiguous() && v_scale.is_contiguous() && k_scale.dtype() == torch::kFloat32 &&
                  v_scale.dtype() == torch::kFloat32, "scales must be contiguous float32");
  Int8Rows rows{k_cache.data_ptr<int8_t>(), v_cache.data_ptr<int8_t>(), k_scale.data_ptr<float>(),
                v_scale.data_ptr<float>(), k_cache.size(2), q.size(2)};
  return run(rows, q, k_cache, block_tables, ctx_lens, out, window, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("paged_decode_attention_int8", &paged_decode_attention_int8, "decode attention over an int8 paged KV cache");
  m.def("paged_decode_attention_depth", &paged_decode_attention_depth,
        "decode attention over a paged KV cache, tokens masked by depth (and their attention, if asked)");
}
