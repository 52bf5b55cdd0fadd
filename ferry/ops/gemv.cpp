// ferry CPU kernels: small-M linear  y = x @ W.T (+ b)  for decode.
//
// At batch 1..16 a linear layer is bound by streaming W from DRAM.  The
// kernels here read every weight byte exactly once per call: a block of RB
// weight rows is multiplied against every row of x while it is hot in L1/L2,
// rows are split across threads with at::parallel_for, and weight lines are
// software-prefetched ahead of use.
//
// One source, one body per instruction-set level. ferry/ops/cpu.py builds it
// once per level with that level's -m flags and FERRY_ISA_LEVEL defined
// (0 portable, 1 AVX2+FMA+F16C, 2 AVX-512, 3 AVX-512 + BF16), and the `#if`s
// below pick the element traits the generic micro kernel runs on:
//
//   level  float32                       bfloat16 weights
//   3      AVX-512 FMA                   AVX-512 BF16 dot products (vdpbf16ps)
//   2      AVX-512 FMA                   bf16 -> f32 by a 16-bit shift, FMA
//   1      AVX2 FMA (2 x 256 bit/line)   bf16 -> f32 by a 16-bit shift, FMA
//   0      GCC vector extensions         bf16 -> f32 by a 16-bit shift, mul+add
//
// Level 0 is plain C++ (no x86 header): it compiles on ARM too, where the
// compiler turns the vector extensions into NEON. cpu_features() still checks
// the CPU at run time, so a build never runs on a CPU without its instructions.
//
// Batch invariance: the result for one row of x never depends on how many
// other rows are in the call (M), nor on the row-block configuration chosen
// for M: every (row of x, row of W) pair is accumulated in its own vector
// accumulator, along K in the same order (one 64-byte step of W at a time,
// the K tail zero-padded), and reduced by the same lane tree. Speculative
// decoding relies on it (verifying k tokens must give what k single steps give).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#if defined(__x86_64__) || defined(_M_X64)
#define FERRY_X86 1
#include <immintrin.h>
#else
#define FERRY_X86 0
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#ifndef FERRY_ISA_LEVEL
#define FERRY_ISA_LEVEL 0
#endif
#if FERRY_ISA_LEVEL > 0 && !FERRY_X86
#error "FERRY_ISA_LEVEL above 0 is for x86-64 builds only"
#endif

#define FERRY_INLINE __attribute__((always_inline)) inline

namespace {

using BF = c10::BFloat16;

FERRY_INLINE float bf16_to_f32(BF v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
FERRY_INLINE float to_f32(float v) { return v; }
FERRY_INLINE float to_f32(BF v) { return bf16_to_f32(v); }

// ---------------------------------------------------------------------------
// Element traits. One step reads 64 bytes (one cache line) of each weight row
// as kParts vectors V of kLanes floats; x is packed (pack_x) as XT, kStep
// elements per step, part u at offset u * kLanes.
//   load_w(p, u): part u of the weight step at p (any alignment)
//   load_x(p, u): part u of the packed x step at p (64-byte aligned)
//   mac(acc, w, x): acc + w * x per lane
//   hsum<C>(a, out): out[i] = the lanes of a[i] summed, by one tree for every i
// A level's Ops supply the vector operations; Traits<Ops, weight type, packed
// x type, parts> the rest. bfloat16 weights without native bf16 arithmetic
// are widened to float32 in registers (a 16-bit shift: exact) against a
// float32 copy of x.
// ---------------------------------------------------------------------------
template <class Ops, class W, class X, int PARTS>
struct Traits {
  using WT = W;
  using XT = X;
  using V = typename Ops::V;
  static constexpr int kStep = 64 / sizeof(W);
  static constexpr int kParts = PARTS;
  static constexpr int kLanes = kStep / PARTS;
  static FERRY_INLINE V zero() { return Ops::zero(); }
  static FERRY_INLINE V load_w(const W* p, int u) { return Ops::load(p + u * kLanes); }
  static FERRY_INLINE V load_x(const X* p, int u) { return Ops::load_aligned(p + u * kLanes); }
  static FERRY_INLINE V mac(V acc, V w, V x) { return Ops::mac(acc, w, x); }
  template <int C>
  static FERRY_INLINE void hsum(const V* a, float* out) { Ops::template hsum<C>(a, out); }
};

// Portable: GCC vector extensions of 8 floats (two SSE or NEON registers, one AVX register).
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

struct GenericOps {
  using V = f32x8;
  static FERRY_INLINE V zero() { return V{0, 0, 0, 0, 0, 0, 0, 0}; }
  static FERRY_INLINE V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static FERRY_INLINE V load(const BF* p) {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const u32x8 bits = __builtin_convertvector(h, u32x8) << 16;
    V v;
    std::memcpy(&v, &bits, sizeof(v));
    return v;
  }
  static FERRY_INLINE V load_aligned(const float* p) { return *reinterpret_cast<const V*>(p); }
  static FERRY_INLINE V mac(V acc, V w, V x) { return acc + w * x; }
  // ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)): the tree of the AVX2 reduction below.
  static FERRY_INLINE float reduce(V v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
  }
  template <int C>
  static FERRY_INLINE void hsum(const V* a, float* out) {
#pragma GCC unroll 64
    for (int i = 0; i < C; ++i) out[i] = reduce(a[i]);
  }
};

#if FERRY_ISA_LEVEL >= 1
struct Avx2Ops {
  using V = __m256;
  static FERRY_INLINE V zero() { return _mm256_setzero_ps(); }
  static FERRY_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
  static FERRY_INLINE V load(const BF* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static FERRY_INLINE V load_aligned(const float* p) { return _mm256_load_ps(p); }
  static FERRY_INLINE V mac(V acc, V w, V x) { return _mm256_fmadd_ps(w, x, acc); }
  static FERRY_INLINE float reduce(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // l[i] + l[i+4]
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                       // s0 + s2, s1 + s3
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                        // (s0 + s2) + (s1 + s3)
    return _mm_cvtss_f32(s);
  }
  template <int C>
  static FERRY_INLINE void hsum(const V* a, float* out) {
#pragma GCC unroll 64
    for (int i = 0; i < C; ++i) out[i] = reduce(a[i]);
  }
};
#endif

#if FERRY_ISA_LEVEL >= 2
// ---------------------------------------------------------------------------
// Horizontal sums: n accumulators -> n floats, out[i] = sum of lanes of a[i].
// A transposing add tree (45 ops for 16 vectors) instead of n separate
// reductions (~8 ops each); matters once M grows and compute shows up.
// ---------------------------------------------------------------------------
FERRY_INLINE __m512 hsum16(const __m512* a) {
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

FERRY_INLINE __m256 hsum8(const __m512* a) {
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
FERRY_INLINE void hsum512(const __m512* a, float* out) {
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

struct Avx512Ops {
  using V = __m512;
  static FERRY_INLINE V zero() { return _mm512_setzero_ps(); }
  static FERRY_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
  static FERRY_INLINE V load(const BF* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static FERRY_INLINE V load_aligned(const float* p) { return _mm512_load_ps(p); }
  static FERRY_INLINE V mac(V acc, V w, V x) { return _mm512_fmadd_ps(w, x, acc); }
  template <int C>
  static FERRY_INLINE void hsum(const V* a, float* out) { hsum512<C>(a, out); }
};
#endif

#if FERRY_ISA_LEVEL >= 3
// Native bf16: x stays bf16, vdpbf16ps multiplies pairs and accumulates in float32.
struct Avx512Bf16Dot {
  using WT = BF;
  using XT = BF;
  using V = __m512;
  static constexpr int kStep = 32, kParts = 1, kLanes = 32;
  static FERRY_INLINE V zero() { return _mm512_setzero_ps(); }
  static FERRY_INLINE V load_w(const BF* p, int) { return _mm512_castsi512_ps(_mm512_loadu_si512(p)); }
  static FERRY_INLINE V load_x(const BF* p, int) { return _mm512_castsi512_ps(_mm512_load_si512(p)); }
  static FERRY_INLINE V mac(V acc, V w, V x) { return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x); }
  template <int C>
  static FERRY_INLINE void hsum(const V* a, float* out) { hsum512<C>(a, out); }
};
#endif

// The element traits of this build's level, and its tile configurations:
// (MT rows of x per pass, RB rows of W per block); RB vectors of W, MT * RB
// accumulators and one of x fit the level's vector registers (AVX-512: 32,
// AVX2: 16). Defaults per M measured with bench/gemv.py.
#if FERRY_ISA_LEVEL >= 2
using F32 = Traits<Avx512Ops, float, float, 1>;
#if FERRY_ISA_LEVEL >= 3
using BF16 = Avx512Bf16Dot;
#else
using BF16 = Traits<Avx512Ops, BF, float, 2>;
#endif
#define FERRY_CONFIGS(X) X(1, 16) X(2, 8) X(8, 3)
constexpr int kDefaultTiles[3][2] = {{1, 16}, {2, 8}, {8, 3}};  // M = 1, M = 2, M >= 3
#elif FERRY_ISA_LEVEL == 1
using F32 = Traits<Avx2Ops, float, float, 2>;
using BF16 = Traits<Avx2Ops, BF, float, 4>;
#define FERRY_CONFIGS(X) X(1, 8) X(2, 4) X(4, 3)
constexpr int kDefaultTiles[3][2] = {{1, 8}, {2, 4}, {4, 3}};
#else
using F32 = Traits<GenericOps, float, float, 2>;
using BF16 = Traits<GenericOps, BF, float, 4>;
#define FERRY_CONFIGS(X) X(1, 8) X(2, 4) X(4, 3)
constexpr int kDefaultTiles[3][2] = {{1, 8}, {2, 4}, {4, 3}};
#endif

// ---------------------------------------------------------------------------
// x packing. Before the parallel loop, x is copied (zero-padded, and widened
// to float32 where XT is) into tile-major, step-interleaved order: for each
// tile of MT rows of x and each 64-byte step of W along K, the tile's row
// steps are adjacent. The micro kernel then reads x as one aligned linear
// stream (instead of MT streams that fall out of L1 for long K), and the K
// tail needs no masked x loads.
// ---------------------------------------------------------------------------
template <class E>
void pack_x(const typename E::WT* x, int64_t M, int64_t K, int64_t MT, typename E::XT* xp) {
  using XT = typename E::XT;
  constexpr int S = E::kStep;
  const int64_t steps = (K + S - 1) / S;
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    XT* tile = xp + m0 * steps * S;
    for (int64_t j = 0; j < steps; ++j) {
      const int64_t k0 = j * S, n = std::min<int64_t>(S, K - k0);
      for (int64_t m = 0; m < mt; ++m) {
        XT* dst = tile + (j * mt + m) * S;
        const auto* src = x + (m0 + m) * K + k0;
        if constexpr (std::is_same_v<XT, typename E::WT>) {
          std::memcpy(dst, src, n * sizeof(XT));
        } else {
          for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
        }
        if (n < S) std::memset(static_cast<void*>(dst + n), 0, (S - n) * sizeof(XT));
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
// every step prefetches each stream `pfd` elements ahead into L2.
// Measured on Zen 4: ~10-20% more bandwidth than hardware prefetching alone,
// which puts M=1 at the speed of a plain streaming read. For MB >= 3
// (compute starts to matter) the next few steps of x and W are also pulled
// into L1.
// ---------------------------------------------------------------------------
#ifndef FERRY_PF_LOCALITY
#define FERRY_PF_LOCALITY 2  // __builtin_prefetch locality: 2 is prefetcht1 (L2) on x86
#endif
#ifndef FERRY_L1PF
#define FERRY_L1PF 8  // steps
#endif

// One 64-byte step of each of RB rows of W (row stride ldw) against MB packed x steps.
template <class E, int MB, int RB>
FERRY_INLINE void step(const typename E::XT* __restrict xp, const typename E::WT* __restrict w, int64_t ldw,
                       typename E::V* acc) {
  using V = typename E::V;
  constexpr int S = E::kStep;
#pragma GCC unroll 8
  for (int u = 0; u < E::kParts; ++u) {
    V wv[RB];
#pragma GCC unroll 64
    for (int r = 0; r < RB; ++r) wv[r] = E::load_w(w + r * ldw, u);
#pragma GCC unroll 64
    for (int m = 0; m < MB; ++m) {
      const V xv = E::load_x(xp + m * S, u);
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r) acc[m * RB + r] = E::mac(acc[m * RB + r], wv[r], xv);
    }
  }
}

template <class E, int MB, int RB, bool PREFETCH>
FERRY_INLINE void micro(const typename E::XT* __restrict xp, const typename E::WT* __restrict w, int64_t K,
                        int64_t pfd, float* __restrict out) {
  using WT = typename E::WT;
  using V = typename E::V;
  constexpr int S = E::kStep;
  V acc[MB * RB];
#pragma GCC unroll 64
  for (int i = 0; i < MB * RB; ++i) acc[i] = E::zero();

  const WT* pfb = w;
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
      for (int r = 0; r < RB; ++r) __builtin_prefetch(pfb + r * K + pfk, 0, FERRY_PF_LOCALITY);
      pfk += S;
      if (pfk >= K) {
        pfk -= K;
        pfb += RB * K;
      }
    }
    if (MB >= 3) {
#pragma GCC unroll 64
      for (int m = 0; m < MB; ++m) __builtin_prefetch(xp + (FERRY_L1PF * MB + m) * S, 0, 3);
#pragma GCC unroll 64
      for (int r = 0; r < RB; ++r) __builtin_prefetch(w + r * K + k + FERRY_L1PF * S, 0, 3);
    }
    step<E, MB, RB>(xp, w + k, K, acc);
  }
  if (k < K) {  // the tail: a zero-padded copy of each row's last partial step (x is zero-padded too)
    alignas(64) WT tail[RB * S];
    std::memset(static_cast<void*>(tail), 0, sizeof(tail));
    for (int r = 0; r < RB; ++r) std::memcpy(static_cast<void*>(tail + r * S), w + r * K + k, (K - k) * sizeof(WT));
    step<E, MB, RB>(xp, tail, S, acc);
  }
  E::template hsum<MB * RB>(acc, out);
}

inline void store_out(float* y, float v) { *y = v; }
inline void store_out(BF* y, float v) { *y = BF(v); }  // RNE

// One block of RB weight rows against all M rows of x, MT rows of x at a
// time. The first M tile streams the rows from DRAM (with prefetch); later
// tiles re-read them from L1/L2.
template <class E, int MT, int RB>
void row_block(const typename E::XT* xp, int64_t M, const typename E::WT* w, int64_t K, int64_t n0,
               const typename E::WT* bias, typename E::WT* y, int64_t N, int64_t pf_bytes) {
  using WT = typename E::WT;
  constexpr int S = E::kStep;
  const int64_t steps = (K + S - 1) / S;
  float out[MT * RB];
  const WT* wr = w + n0 * K;
  // pf_bytes is the total distance ahead, spread over the RB row streams.
  const int64_t pfd = std::max<int64_t>(S, (pf_bytes / RB) / 64 * 64 / (int64_t)sizeof(WT));
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    const typename E::XT* xt = xp + m0 * steps * S;
    switch (mt) {
#define FERRY_CASE(MBV)                                   \
  case MBV:                                               \
    if constexpr (MBV <= MT) {                            \
      if (m0 == 0)                                        \
        micro<E, MBV, RB, true>(xt, wr, K, pfd, out);     \
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
      WT* yr = y + (m0 + m) * N + n0;
      for (int r = 0; r < RB; ++r) {
        float v = out[m * RB + r];
        if (bias) v += to_f32(bias[n0 + r]);
        store_out(yr + r, v);
      }
    }
  }
}

// Row blocks [nb0, nb1) of W; block index N / RB (if N % RB) is the tail,
// done one row at a time.
template <class E, int MT, int RB>
void run_range(const typename E::XT* xp, int64_t M, const typename E::WT* w, int64_t K,
               const typename E::WT* bias, typename E::WT* y, int64_t N, int64_t nb0, int64_t nb1,
               int64_t pf_bytes) {
  const int64_t nfull = N / RB;
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    if (nb < nfull) {
      row_block<E, MT, RB>(xp, M, w, K, nb * RB, bias, y, N, pf_bytes);
    } else {
      for (int64_t n = nfull * RB; n < N; ++n) row_block<E, MT, 1>(xp, M, w, K, n, bias, y, N, pf_bytes);
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
void launch(const typename E::WT* x, int64_t M, const typename E::WT* w, int64_t K, const typename E::WT* bias,
            typename E::WT* y, int64_t N, int64_t pf_bytes, int64_t min_rows_per_task) {
  using XT = typename E::XT;
  using WT = typename E::WT;
  constexpr int S = E::kStep;
  static thread_local AlignedBuf buf;
  const int64_t steps = (K + S - 1) / S;
  XT* xp = static_cast<XT*>(buf.get(sizeof(XT) * M * steps * S));
  pack_x<E>(x, M, K, MT, xp);
  const int64_t nblocks = N / RB + (N % RB ? 1 : 0);
  // Threads only pay off with enough weight bytes per task (fork/join costs
  // ~1-2 us): by default at least 64 KB of W per task.
  if (min_rows_per_task <= 0)
    min_rows_per_task = (65536 + K * (int64_t)sizeof(WT) - 1) / (K * (int64_t)sizeof(WT));
  const int64_t grain = std::max<int64_t>(1, (min_rows_per_task + RB - 1) / RB);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    run_range<E, MT, RB>(xp, M, w, K, bias, y, N, b0, b1, pf_bytes);
  });
}

template <class E>
void dispatch(const typename E::WT* x, int64_t M, const typename E::WT* w, int64_t K, const typename E::WT* bias,
              typename E::WT* y, int64_t N, int64_t mt, int64_t rb, int64_t pf_bytes, int64_t min_rows) {
  if (mt <= 0 || rb <= 0) {
    const int* tile = kDefaultTiles[std::min<int64_t>(M, 3) - 1];
    mt = tile[0], rb = tile[1];
  }
  if (pf_bytes < 0) pf_bytes = 24576;
#define FERRY_X(A, B) \
  if (mt == A && rb == B) return launch<E, A, B>(x, M, w, K, bias, y, N, pf_bytes, min_rows);
  FERRY_CONFIGS(FERRY_X)
#undef FERRY_X
  TORCH_CHECK(false, "ferry gemv: no tile config mt=", mt, " rb=", rb, " in this build (level ", FERRY_ISA_LEVEL, ")");
}

// Streaming-read reference: the sum of a buffer's floats, split across
// threads like the kernel. bench/gemv.py reports the read bandwidth it gets
// next to the kernel's.
float read_range(const float* p, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += p[i];
  return acc;
}

// Does this CPU have the instructions this build was compiled for? (The
// Python side never loads a build above the CPU's level; this is the check
// that a wrong cache or a bad override cannot get past.)
bool detect_level() {
#if FERRY_X86
  __builtin_cpu_init();
  bool ok = true;
#if FERRY_ISA_LEVEL >= 1
  ok = ok && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
#if FERRY_ISA_LEVEL >= 2
  ok = ok && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
#if FERRY_ISA_LEVEL >= 3
  ok = ok && __builtin_cpu_supports("avx512bf16");
#endif
  return ok;
#else
  return true;
#endif
}

bool cpu_ok() {
  static const bool ok = detect_level();
  return ok;
}

// Largest M sent to the kernel per dtype (set from Python, see MAX_M there).
std::atomic<int64_t> g_max_m_f32{16}, g_max_m_bf16{16};
std::atomic<int64_t> g_kernel_calls{0};

}  // namespace

// bit 0: float32 kernel usable, bit 1: bfloat16 kernel usable (both need
// the CPU to have this build's level), bit 2: bfloat16 is native (vdpbf16ps).
int64_t cpu_features() {
  if (!cpu_ok()) return 0;
  return 1 | 2 | (FERRY_ISA_LEVEL >= 3 ? 4 : 0);
}

int64_t isa_level() { return FERRY_ISA_LEVEL; }

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
    TORCH_CHECK(cpu_ok(), "ferry gemv: this CPU lacks the instructions of the build (level ", FERRY_ISA_LEVEL, ")");
    dispatch<F32>(x.data_ptr<float>(), M, w.data_ptr<float>(), K,
                  static_cast<const float*>(bptr), y.data_ptr<float>(), N, mt, rb, pf, min_rows);
  } else if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(cpu_ok(), "ferry gemv: this CPU lacks the instructions of the build (level ", FERRY_ISA_LEVEL, ")");
    using B = c10::BFloat16;
    dispatch<BF16>(x.data_ptr<B>(), M, w.data_ptr<B>(), K, static_cast<const B*>(bptr),
                   y.data_ptr<B>(), N, mt, rb, pf, min_rows);
  } else {
    TORCH_CHECK(false, "ferry gemv: unsupported dtype ", x.scalar_type());
  }
  return y;
}

// Rows of a bfloat16 matmul above the kernel's range, rounded up to 8 sizes per
// power of two (steps of 16 at least): torch's bf16 matmul goes through oneDNN,
// and ideep keeps one primitive (~250 KB, and 7-35 ms to create) per distinct
// row count in an LRU of 1024. A server's steps have a new token count almost
// every time, so without rounding the process grew by ~1 MB per 40 requests and
// paid a primitive creation per new count; rounded, the distinct counts up to
// 4096 rows are ~50 per weight shape, at most 12.5% padded rows.
int64_t bf16_rows_bucket(int64_t m) {
  int64_t top = 1;
  while (top * 2 <= m) top *= 2;
  const int64_t step = std::max<int64_t>(16, top / 8);
  return (m + step - 1) / step * step;
}

torch::Tensor bucketed_linear(const torch::Tensor& x, const torch::Tensor& w,
                              const c10::optional<torch::Tensor>& bias) {
  if (x.scalar_type() != at::kBFloat16 || w.scalar_type() != at::kBFloat16 || x.dim() < 1 ||
      x.size(-1) == 0 || !x.device().is_cpu() || (at::GradMode::is_enabled() && x.requires_grad()))
    return at::linear(x, w, bias);
  const int64_t K = x.size(-1), M = x.numel() / K, Mb = bf16_rows_bucket(M);
  if (Mb == M || M <= 16) return at::linear(x, w, bias);
  auto xp = torch::empty({Mb, K}, x.options());
  xp.narrow(0, 0, M).copy_(x.reshape({M, K}));
  xp.narrow(0, M, Mb - M).zero_();
  torch::Tensor y = at::linear(xp, w, bias).narrow(0, 0, M);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = y.size(1);
  return y.view(shape);
}

// Drop-in for F.linear: the kernel when it applies (CPU, float32/bf16 with
// CPU support, contiguous 2-D weight, 1 <= M <= max_m rows after flattening
// leading dims, no autograd needed),
// at::linear otherwise. Doing the checks
// here keeps the per-call overhead ~1 us instead of ~6 us in Python.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w,
                     const c10::optional<torch::Tensor>& bias) {
  const bool has_bias = bias.has_value() && bias->defined();
  const auto dt = x.scalar_type();
  int64_t max_m = 0;
  if (dt == at::kFloat && cpu_ok()) max_m = g_max_m_f32.load(std::memory_order_relaxed);
  else if (dt == at::kBFloat16 && cpu_ok()) max_m = g_max_m_bf16.load(std::memory_order_relaxed);
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
    // Every M up to max_m runs here, small weights included (float32 M > 8
    // used to go to MKL, about as fast there): a row's result must not
    // depend on how many rows share the call (batch invariance, see above).
    ok = M >= 1 && M <= max_m;
  }
  if (ok && has_bias)
    ok = bias->scalar_type() == dt && bias->dim() == 1 && bias->size(0) == w.size(0) &&
         bias->device().is_cpu() && bias->layout() == at::kStrided;
  if (ok && at::GradMode::is_enabled())
    ok = !(x.requires_grad() || w.requires_grad() || (has_bias && bias->requires_grad()));
  if (!ok) return bucketed_linear(x, w, bias);

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
  const float* p = static_cast<const float*>(t.data_ptr());
  const int64_t n = t.numel() * t.element_size() / 4;
  std::vector<float> part(std::max(1, at::get_num_threads()), 0.f);
  at::parallel_for(0, n, 65536, [&](int64_t b, int64_t e) {
    part[at::get_thread_num() % part.size()] += read_range(p + b, e - b);
  });
  double s = 0;
  for (float v : part) s += v;
  return s;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &stream_read, "read a tensor's bytes (bandwidth reference)");
  m.def("cpu_features", &cpu_features, "bit 0: float32 runs, bit 1: bfloat16 runs, bit 2: bfloat16 is native");
  m.def("isa_level", &isa_level, "the FERRY_ISA_LEVEL this module was built for");
  m.def("linear", &linear, "F.linear with the small-M kernel where it applies", py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("set_max_m", &set_max_m, "largest M using the kernel (float32, bfloat16)");
  m.def("bf16_rows_bucket", &bf16_rows_bucket, "rows a bfloat16 matmul of m rows above the kernel's range runs with");
  m.def("kernel_calls", &kernel_calls, "number of kernel invocations (for tests)");
  m.def("linear_small_m", &linear_small_m, "y = x @ w.T + b for small M",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("mt") = 0, py::arg("rb") = 0,
        py::arg("pf") = -1, py::arg("min_rows") = 0);
}
