// ferry CPU kernels: small-M linear  y = x @ W.T (+ b)  for decode.
//
// At batch 1..16 a linear layer is bound by streaming W from DRAM.  The
// kernels here read every weight byte exactly once per call: a block of RB
// weight rows is multiplied against every row of x while it is hot in L1/L2,
// rows are split across threads with at::parallel_for, and weight lines are
// software-prefetched ahead of use.
//
// The AVX-512 code lives in functions carrying __attribute__((target(...))),
// and every kernel also checks the CPU at run time (cpu_features() tells the
// Python side which may be called). ferry/ops/gemv.py builds this file only
// for an AVX-512 level (ferry/ops/cpu.py): below it F.linear runs instead.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <atomic>

namespace {

#define FERRY_TGT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FERRY_TGT_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// ---------------------------------------------------------------------------
// Element traits: one 64-byte vector of weights per step.
// ---------------------------------------------------------------------------
struct F32 {
  using T = float;
  static constexpr int kStep = 16;  // elements per 64-byte vector
  FERRY_TGT static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  FERRY_TGT static inline __m512 load_aligned(const float* p) { return _mm512_load_ps(p); }
  FERRY_TGT static inline __m512 load_tail(const float* p, int n) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
  }
  FERRY_TGT static inline __m512 mac(__m512 acc, __m512 w, __m512 x) {
    return _mm512_fmadd_ps(w, x, acc);
  }
};

struct BF16 {
  using T = c10::BFloat16;
  static constexpr int kStep = 32;
  FERRY_TGT_BF16 static inline __m512 load(const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_loadu_si512((const void*)p));
  }
  FERRY_TGT_BF16 static inline __m512 load_aligned(const c10::BFloat16* p) {
    return _mm512_castsi512_ps(_mm512_load_si512((const void*)p));
  }
  FERRY_TGT_BF16 static inline __m512 load_tail(const c10::BFloat16* p, int n) {
    return _mm512_castsi512_ps(
        _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1ull), (const void*)p));
  }
  FERRY_TGT_BF16 static inline __m512 mac(__m512 acc, __m512 w, __m512 x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
};

// ---------------------------------------------------------------------------
// Horizontal sums: n accumulators -> n floats, out[i] = sum of lanes of a[i].
// A transposing add tree (45 ops for 16 vectors) instead of n separate
// reductions (~8 ops each); matters once M grows and compute shows up.
// ---------------------------------------------------------------------------
FERRY_TGT __attribute__((always_inline)) inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[i], b[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    d[i] = _mm512_add_ps(_mm512_shuffle_ps(c[i], c[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[i], c[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // e = [a0 a2 a1 a3 | a8 a10 a9 a11 | a4 a6 a5 a7 | a12 a14 a13 a15]
  const __m512i idx = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(idx, e);
}

FERRY_TGT __attribute__((always_inline)) inline __m256 hsum8(const __m512* a) {
  __m512 b[4], c[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[i], b[i + 2], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[i], b[i + 2], _MM_SHUFFLE(3, 1, 3, 1)));
  // c0 lanes: a0 a4 a2 a6, c1 lanes: a1 a5 a3 a7
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e = _mm512_add_ps(d, _mm512_permute_ps(d, _MM_SHUFFLE(2, 3, 0, 1)));
  // e = [a0 a0 a1 a1 | a4 a4 a5 a5 | a2 a2 a3 a3 | a6 a6 a7 a7]
  const __m512i idx = _mm512_setr_epi32(0, 2, 8, 10, 4, 6, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, e));
}

template <int C>
FERRY_TGT __attribute__((always_inline)) inline void hsum(const __m512* a, float* out) {
  int i = 0;
#pragma GCC unroll 8
  for (; i + 16 <= C; i += 16) _mm512_storeu_ps(out + i, hsum16(a + i));
  if constexpr (C % 16 >= 8) {
    _mm256_storeu_ps(out + i, hsum8(a + i));
    i += 8;
  }
#pragma GCC unroll 8
  for (; i < C; ++i) out[i] = _mm512_reduce_add_ps(a[i]);
}

// ---------------------------------------------------------------------------
// x packing. Before the parallel loop, x is copied (zero-padded) into
// tile-major, step-interleaved order: for each tile of MT rows of x and each
// 64-byte step along K, the tile's row vectors are adjacent. The micro kernel
// then reads x as one aligned linear stream (instead of MT streams that fall
// out of L1 for long K), and the K tail needs no masked x loads.
// ---------------------------------------------------------------------------
template <class E>
void pack_x(const typename E::T* x, int64_t M, int64_t K, int64_t MT,
            typename E::T* xp) {
  using T = typename E::T;
  constexpr int S = E::kStep;
  const int64_t steps = (K + S - 1) / S;
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    T* tile = xp + m0 * steps * S;
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t k0 = j * S, n = std::min<int64_t>(S, K - k0);
      for (int64_t m = 0; m < mt; ++m) {
        T* dst = tile + (j * mt + m) * S;
        std::memcpy(dst, x + (m0 + m) * K + k0, n * sizeof(T));
        if (n < S) std::memset(static_cast<void*>(dst + n), 0, (S - n) * sizeof(T));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Micro kernel: MB rows of x  x  RB rows of W, full K.
// out[m * RB + r] = sum_k x[m, k] * w[r, k];  xp is the packed x tile.
//
// Prefetch (first M tile only, the one that pulls W from DRAM): each of the
// RB rows is a stream that continues into the same row of the next block;
// every step prefetches each stream `pfd` elements ahead into L2 (T1).
// Measured on Zen 4: ~10-20% more bandwidth than hardware prefetching alone,
// which puts M=1 at the speed of a plain streaming read. For MB >= 3
// (compute starts to matter) the next few steps of x and W are also pulled
// into L1.
// ---------------------------------------------------------------------------
#ifndef FERRY_PF_HINT
#define FERRY_PF_HINT _MM_HINT_T1
#endif
#ifndef FERRY_L1PF
#define FERRY_L1PF 8  // steps
#endif

template <class E, int MB, int RB, bool PREFETCH>
FERRY_TGT_BF16 __attribute__((always_inline)) inline void micro(
    const typename E::T* __restrict xp, const typename E::T* __restrict w, int64_t K,
    int64_t pfd, float* __restrict out) {
  using T = typename E::T;
  constexpr int S = E::kStep;
  __m512 acc[MB * RB];
#pragma GCC unroll 64
  for (int i = 0; i < MB * RB; ++i) acc[i] = _mm512_setzero_ps();

  const T* pfb = w;
  int64_t pfk = 0;
  if (PREFETCH) {
    pfb = w + (pfd / K) * RB * K;
    pfk = pfd % K;
  }
  const int64_t Kmain = K - K % S;
  int64_t k = 0;
  for (; k < Kmain; k += S, xp += MB * S) {
    if (PREFETCH) {
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pfb + r * K + pfk), FERRY_PF_HINT);
      pfk += S;
      if (pfk >= K) {
        pfk -= K;
        pfb += RB * K;
      }
    }
    if (MB >= 3) {
#pragma GCC unroll 64
      for (int m = 0; m < MB; ++m)
        _mm_prefetch(reinterpret_cast<const char*>(xp + (FERRY_L1PF * MB + m) * S), _MM_HINT_T0);
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + FERRY_L1PF * S), _MM_HINT_T0);
    }
    __m512 wv[RB];
#pragma GCC unroll 64
    for (int r = 0; r < RB; ++r) wv[r] = E::load(w + r * K + k);
#pragma GCC unroll 64
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = E::load_aligned(xp + m * S);
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r) acc[m * RB + r] = E::mac(acc[m * RB + r], wv[r], xv);
    }
  }
  if (k < K) {
    const int n = (int)(K - k);
    __m512 wv[RB];
#pragma GCC unroll 64
    for (int r = 0; r < RB; ++r) wv[r] = E::load_tail(w + r * K + k, n);
#pragma GCC unroll 64
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = E::load_aligned(xp + m * S);  // zero-padded
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r) acc[m * RB + r] = E::mac(acc[m * RB + r], wv[r], xv);
    }
  }
  hsum<MB * RB>(acc, out);
}

inline void store_out(float* y, float v) { *y = v; }
inline void store_out(c10::BFloat16* y, float v) { *y = c10::BFloat16(v); }  // RNE

// One block of RB weight rows against all M rows of x, MT rows of x at a
// time. The first M tile streams the rows from DRAM (with prefetch); later
// tiles re-read them from L1/L2.
template <class E, int MT, int RB>
FERRY_TGT_BF16 void row_block(const typename E::T* xp, int64_t M, const typename E::T* w,
                              int64_t K, int64_t n0, const typename E::T* bias,
                              typename E::T* y, int64_t N, int64_t pf_bytes) {
  using T = typename E::T;
  constexpr int S = E::kStep;
  const int64_t steps = (K + S - 1) / S;
  float out[MT * RB];
  const T* wr = w + n0 * K;
  // pf_bytes is the total distance ahead, spread over the RB row streams.
  const int64_t pfd = std::max<int64_t>(S, (pf_bytes / RB) / 64 * 64 / (int64_t)sizeof(T));
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    const T* xt = xp + m0 * steps * S;
    switch (mt) {
#define FERRY_CASE(MBV)                                   \
  case MBV:                                               \
    if constexpr (MBV <= MT) {                            \
      if (m0 == 0)                                        \
        micro<E, MBV, RB, true>(xt, wr, K, pfd, out);      \
      else                                                \
        micro<E, MBV, RB, false>(xt, wr, K, pfd, out);    \
    }                                                     \
    break;
      FERRY_CASE(1) FERRY_CASE(2) FERRY_CASE(3) FERRY_CASE(4)
      FERRY_CASE(5) FERRY_CASE(6) FERRY_CASE(7) FERRY_CASE(8)
#undef FERRY_CASE
      default:
        break;
    }
    for (int64_t m = 0; m < mt; ++m) {
      T* yr = y + (m0 + m) * N + n0;
      for (int r = 0; r < RB; ++r) {
        float v = out[m * RB + r];
        if (bias) v += static_cast<float>(bias[n0 + r]);
        store_out(yr + r, v);
      }
    }
  }
}

// Row blocks [nb0, nb1) of W; block index N / RB (if N % RB) is the tail,
// done one row at a time.
template <class E, int MT, int RB>
FERRY_TGT_BF16 void run_range(const typename E::T* xp, int64_t M, const typename E::T* w,
                              int64_t K, const typename E::T* bias, typename E::T* y,
                              int64_t N, int64_t nb0, int64_t nb1, int64_t pf_bytes) {
  const int64_t nfull = N / RB;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    if (nb < nfull) {
      row_block<E, MT, RB>(xp, M, w, K, nb * RB, bias, y, N, pf_bytes);
    } else {
      for (int64_t n = nfull * RB; n < N; ++n)
        row_block<E, MT, 1>(xp, M, w, K, n, bias, y, N, pf_bytes);
    }
  }
}

// 64-byte aligned scratch for packed x, one per calling thread (reused).
struct AlignedBuf {
  void* p = nullptr;
  size_t cap = 0;
  ~AlignedBuf() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      TORCH_CHECK(p != nullptr, "ferry gemv: out of memory");
    }
    return p;
  }
};

template <class E, int MT, int RB>
void launch(const typename E::T* x, int64_t M, const typename E::T* w, int64_t K,
            const typename E::T* bias, typename E::T* y, int64_t N, int64_t pf_bytes,
            int64_t min_rows_per_task) {
  using T = typename E::T;
  constexpr int S = E::kStep;
  static thread_local AlignedBuf buf;
  const int64_t steps = (K + S - 1) / S;
  T* xp = static_cast<T*>(buf.get(sizeof(T) * M * steps * S));
  pack_x<E>(x, M, K, MT, xp);
  const int64_t nblocks = N / RB + (N % RB ? 1 : 0);
  // Threads only pay off with enough weight bytes per task (fork/join costs
  // ~1-2 us): by default at least 64 KB of W per task.
  if (min_rows_per_task <= 0)
    min_rows_per_task = (65536 + K * (int64_t)sizeof(T) - 1) / (K * (int64_t)sizeof(T));
  const int64_t grain = std::max<int64_t>(1, (min_rows_per_task + RB - 1) / RB);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    run_range<E, MT, RB>(xp, M, w, K, bias, y, N, b0, b1, pf_bytes);
  });
}

// Tile configurations: (MT rows of x per pass, RB rows of W per block).
#ifndef FERRY_CONFIGS
#define FERRY_CONFIGS(X) X(1, 16) X(2, 8) X(8, 3)
#endif

template <class E>
void dispatch(const typename E::T* x, int64_t M, const typename E::T* w, int64_t K,
              const typename E::T* bias, typename E::T* y, int64_t N, int64_t mt,
              int64_t rb, int64_t pf_bytes, int64_t min_rows) {
  // Defaults measured on Zen 4 (bench/gemv.py, weights streamed from DRAM).
  if (mt <= 0 || rb <= 0) {
    if (M == 1) mt = 1, rb = 16;
    else if (M == 2) mt = 2, rb = 8;
    else mt = 8, rb = 3;
  }
  if (pf_bytes < 0) pf_bytes = 24576;
#define FERRY_X(A, B) \
  if (mt == A && rb == B) return launch<E, A, B>(x, M, w, K, bias, y, N, pf_bytes, min_rows);
  FERRY_CONFIGS(FERRY_X)
#undef FERRY_X
  TORCH_CHECK(false, "ferry gemv: no tile config mt=", mt, " rb=", rb);
}

// Streaming-read reference: sum of 64-byte lines of a buffer viewed as
// floats, split across threads like the kernel. Used by bench/gemv.py to
// report the attainable DRAM read bandwidth next to the kernel's.
FERRY_TGT float read_range(const char* p, int64_t nlines) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 4 <= nlines; i += 4) {
    const float* q = reinterpret_cast<const float*>(p + 64 * i);
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(q));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(q + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(q + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(q + 48));
  }
  for (; i < nlines; ++i)
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(reinterpret_cast<const float*>(p + 64 * i)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

bool detect_avx512f() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma");
}

bool cpu_has_avx512f() {
  static const bool has = detect_avx512f();
  return has;
}

// The build's instruction-set level (ferry/ops/cpu.py, set by the build): a build for plain AVX-512 never runs
// the bf16 kernel, so FERRY_ISA=avx512 on a bf16 CPU takes the path such CPUs take.
#ifndef FERRY_ISA_LEVEL
#define FERRY_ISA_LEVEL 3
#endif

bool cpu_has_avx512bf16() {
  static const bool has = FERRY_ISA_LEVEL >= 3 && cpu_has_avx512f() && __builtin_cpu_supports("avx512bf16");
  return has;
}

// Largest M sent to the kernel per dtype (set from Python, see MAX_M there).
std::atomic<int64_t> g_max_m_f32{16}, g_max_m_bf16{16};
std::atomic<int64_t> g_kernel_calls{0};

}  // namespace

// bit 0: float32 kernel usable (AVX-512F/BW/VL/DQ + FMA), bit 1: bf16 kernel
// usable (additionally AVX512_BF16).
int64_t cpu_features() {
  return (cpu_has_avx512f() ? 1 : 0) | (cpu_has_avx512bf16() ? 2 : 0);
}

// y = x @ w.T (+ bias). x: [M, K], w: [N, K], bias: [N] or None. All
// contiguous CPU tensors of one dtype (float32 or bfloat16). mt/rb/pf/min_rows
// are tuning knobs (<= 0 / < 0: defaults; pf is in bytes).
torch::Tensor linear_small_m(const torch::Tensor& x, const torch::Tensor& w,
                             const c10::optional<torch::Tensor>& bias, int64_t mt,
                             int64_t rb, int64_t pf, int64_t min_rows) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "ferry gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "ferry gemv: x and w must be 2-D");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "ferry gemv: dtype mismatch");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous(), "ferry gemv: need contiguous x, w");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K, "ferry gemv: shape mismatch");
  TORCH_CHECK(M >= 1 && M <= 64, "ferry gemv: M must be in [1, 64]");
  const void* bptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() &&
                    bias->dim() == 1 && bias->size(0) == N,
                "ferry gemv: bad bias");
    bptr = bias->data_ptr();
  }
  auto y = torch::empty({M, N}, x.options());
  if (N == 0) return y;
  if (K == 0) {
    if (bptr) y.copy_(bias->unsqueeze(0).expand({M, N}));
    else y.zero_();
    return y;
  }
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  if (x.scalar_type() == at::kFloat) {
    TORCH_CHECK(cpu_has_avx512f(), "ferry gemv: CPU lacks AVX-512");
    dispatch<F32>(x.data_ptr<float>(), M, w.data_ptr<float>(), K,
                  static_cast<const float*>(bptr), y.data_ptr<float>(), N, mt, rb, pf, min_rows);
  } else if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(cpu_has_avx512bf16(), "ferry gemv: CPU lacks AVX512_BF16");
    using B = c10::BFloat16;
    dispatch<BF16>(x.data_ptr<B>(), M, w.data_ptr<B>(), K, static_cast<const B*>(bptr),
                   y.data_ptr<B>(), N, mt, rb, pf, min_rows);
  } else {
    TORCH_CHECK(false, "ferry gemv: unsupported dtype ", x.scalar_type());
  }
  return y;
}

// Drop-in for F.linear: the kernel when it applies (CPU, float32/bf16 with
// CPU support, contiguous 2-D weight, 1 <= M <= max_m rows after flattening
// leading dims, no autograd needed, not float32 M > 8 with a small weight),
// at::linear otherwise. Doing the checks
// here keeps the per-call overhead ~1 us instead of ~6 us in Python.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w,
                     const c10::optional<torch::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const auto dt = x.scalar_type();
  int64_t max_m = 0;
  if (dt == at::kFloat && cpu_has_avx512f()) max_m = g_max_m_f32.load(std::memory_order_relaxed);
  else if (dt == at::kBFloat16 && cpu_has_avx512bf16())
    max_m = g_max_m_bf16.load(std::memory_order_relaxed);
  bool ok = max_m > 0 && w.scalar_type() == dt && x.dim() >= 1 && w.dim() == 2 &&
            x.layout() == at::kStrided && w.layout() == at::kStrided && x.device().is_cpu() &&
            w.device().is_cpu() && w.is_contiguous();
  int64_t K = 0, M = 0;
  if (ok) {
    K = x.size(-1);
    ok = K > 0 && w.size(1) == K && w.size(0) > 0;
  }
  if (ok) {
    M = x.numel() / K;
    ok = M >= 1 && M <= max_m;
    // float32 with M > 8 is compute-bound and MKL's sgemm is about as fast;
    // only weights that must stream from DRAM (>= 1 MiB) still gain.
    if (ok && dt == at::kFloat && M > 8 && w.size(0) * K * 4 < (int64_t(1) << 20)) ok = false;
  }
  if (ok && has_bias)
    ok = bias->scalar_type() == dt && bias->dim() == 1 && bias->size(0) == w.size(0) &&
         bias->device().is_cpu() && bias->layout() == at::kStrided;
  if (ok && at::GradMode::is_enabled())
    ok = !(x.requires_grad() || w.requires_grad() || (has_bias && bias->requires_grad()));
  if (!ok) return at::linear(x, w, bias);

  const torch::Tensor x2 = (x.dim() == 2 ? x : x.reshape({M, K})).contiguous();
  c10::optional<torch::Tensor> b2;
  if (has_bias) b2 = bias->contiguous();
  torch::Tensor y = linear_small_m(x2, w, b2, 0, 0, -1, 0);
  if (x.dim() == 2) return y;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return y.view(shape);
}

void set_max_m(int64_t f32, int64_t bf16) {
  g_max_m_f32.store(std::clamp<int64_t>(f32, 0, 64));  // linear_small_m takes M <= 64
  g_max_m_bf16.store(std::clamp<int64_t>(bf16, 0, 64));
}

int64_t kernel_calls() { return g_kernel_calls.load(); }

double stream_read(const torch::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "stream_read: contiguous CPU tensor");
  TORCH_CHECK(cpu_has_avx512f(), "stream_read: CPU lacks AVX-512");
  const char* p = static_cast<const char*>(t.data_ptr());
  const int64_t nlines = t.numel() * t.element_size() / 64;
  std::vector<float> part(std::max(1, at::get_num_threads()), 0.f);
  at::parallel_for(0, nlines, 4096, [&](int64_t b, int64_t e) {
    part[at::get_thread_num() % part.size()] += read_range(p + 64 * b, e - b);
  });
  double s = 0;
  for (float v : part) s += v;
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &stream_read, "read a tensor's bytes (bandwidth reference)");
  m.def("cpu_features", &cpu_features);
  m.def("linear", &linear, "F.linear with the small-M kernel where it applies", py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("set_max_m", &set_max_m, "largest M using the kernel (float32, bfloat16)");
  m.def("kernel_calls", &kernel_calls, "number of kernel invocations (for tests)");
  m.def("linear_small_m", &linear_small_m, "y = x @ w.T + b for small M",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("mt") = 0, py::arg("rb") = 0,
        py::arg("pf") = -1, py::arg("min_rows") = 0);
}
