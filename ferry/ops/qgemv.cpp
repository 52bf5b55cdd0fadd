// ferry CPU kernels: weight-only int8 / int4 linear  y = x @ W.T  for small M (decode), on the stored form.
//
// The weight is read as stored (ferry/ops/quant.py): codes int8 [N, K] or uint8 [N, K/2] (Q4_0 blocks of 32
// inputs: byte i of a block holds input i in its low nibble and input i + 16 in its high one, nibble u means
// u - 8), float16 scales [N, K/G]. No repacking: what is on disk (an expert slot, a converted folder) is what
// runs, on every CPU.
//
// Like llama.cpp's Q4_0 x Q8_0 / Q8_0 x Q8_0 dot products, x is quantized on the fly, per row and block of 32
// inputs, to int8 with one float scale (d = max|x| / 127, q = round-to-nearest-even(x / d)): the only rounding
// besides float accumulation. Each block's code x q dot product is exact in int32; it is scaled by
// d_x * d_w in float32 and summed in float32 (lanes, then a horizontal sum). Every level quantizes x with the
// same scalar code, so the int32 sums are identical on every path; results differ only in the order of the
// float32 sums.
//
// Batch 1 reads each weight byte once: a block of RB weight rows is unpacked in registers and multiplied with
// every row of x (MT rows at a time, the later tiles re-reading the block from L1); rows are split across
// threads with at::parallel_for; code lines are prefetched ahead of use.
//
// Paths (FERRY_ISA_LEVEL, set by the build for the level in force, ferry/ops/cpu.py):
//   3 avx512_bf16 (these CPUs all have AVX512-VNNI, checked at run time): vpdpbusd on unsigned codes
//     (int4: the nibble u; int8: w + 128) x signed q, minus 8 x sum(q) (int4) / 128 x sum(q) (int8) folded
//     into the accumulator's start value, precomputed with x;
//   2 avx512: the same with vpmaddubsw + vpmaddwd (int8: |w| x sign(w) q, llama.cpp's sign trick);
//   1 avx2: vpmaddubsw + vpmaddwd on 256-bit vectors, as llama.cpp's AVX2 dot products;
//   0 portable: plain C++ per block.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if FERRY_ISA_LEVEL >= 1
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifndef FERRY_ISA_LEVEL
#define FERRY_ISA_LEVEL 0
#endif

namespace {

constexpr int QK = 32;  // inputs per block (x's quantization block; int4's packing block)
std::atomic<int64_t> g_kernel_calls{0};

// Scratch memory reused across calls (one per thread: the caller's for x, each worker's for its scales), so a
// decode step allocates nothing but its output tensor.
struct Scratch {
  void* p = nullptr;
  size_t cap = 0;
  ~Scratch() { std::free(p); }
  template <class T>
  T* get(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (bytes > cap) {
      std::free(p);
      cap = (bytes + 4095) & ~size_t(4095);
      p = std::aligned_alloc(64, cap);
      TORCH_CHECK(p != nullptr, "ferry qgemv: out of memory for ", cap, " bytes of scratch");
    }
    return static_cast<T*>(p);
  }
};

// ---------------------------------------------------------------------------------------------------------
// x quantization (every path): one block of 32 inputs -> q int8 [32], d float. Scalar, so all levels agree.
// ---------------------------------------------------------------------------------------------------------
template <class T>
inline void quantize_block(const T* xb, int8_t* q, float* d) {
  float v[QK], amax = 0.f;
  for (int j = 0; j < QK; ++j) {
    v[j] = static_cast<float>(xb[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
  const float dx = amax / 127.f;
  const float id = dx > 0.f ? 1.f / dx : 0.f;
  // round half to even by the 1.5 x 2^23 trick (|v id| <= 127 + ulp): the same bits as nearbyint, without a
  // libm call at the portable level. Built with -ffp-contract=off, so v * id is rounded before the add.
  for (int j = 0; j < QK; ++j) {
    const float t = v[j] * id;
    const float r = (t + 12582912.f) - 12582912.f;
    q[j] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, r)));
  }
  *d = dx;
}

// x [M, K] -> q int8 [M, K], d float [M, K/32].
template <class T>
void quantize_x(const T* x, int64_t M, int64_t K, int8_t* q, float* d) {
  for (int64_t i = 0; i < M * (K / QK); ++i) quantize_block(x + i * QK, q + i * QK, d + i);
}

inline float half_to_float(c10::Half h) {
#if FERRY_ISA_LEVEL >= 1
  return _cvtsh_ss(h.x);  // F16C: every level above portable has it
#else
  return static_cast<float>(h);
#endif
}

// A weight row's ng group scales as one float per block of 32 inputs (ng x bpg entries, zero-padded to
// `padded`). No division, and a vector conversion where each group is one block (int4's usual group 32):
// this ran once per row and block, and with an integer division per block it took ~40% of the kernel's time.
inline void expand_scales(const c10::Half* s, int64_t ng, int64_t bpg, int64_t padded, float* out) {
  int64_t b = 0;
  if (bpg == 1) {
#if FERRY_ISA_LEVEL >= 1
    for (; b + 8 <= ng; b += 8)
      _mm256_storeu_ps(out + b, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + b))));
#endif
    for (; b < ng; ++b) out[b] = half_to_float(s[b]);
  } else {
    for (int64_t g = 0; g < ng; ++g) {
      const float v = half_to_float(s[g]);
      for (int64_t j = 0; j < bpg; ++j) out[b++] = v;
    }
  }
  for (; b < padded; ++b) out[b] = 0.f;
}

inline void store_out(float* y, float v) { *y = v; }
inline void store_out(c10::BFloat16* y, float v) { *y = c10::BFloat16(v); }  // RNE

// ---------------------------------------------------------------------------------------------------------
// Portable path: per row, per block, an exact int32 dot product, scaled and summed in float.
// ---------------------------------------------------------------------------------------------------------
template <int BITS>
inline int32_t block_dot(const uint8_t* c, const int8_t* q) {
  int32_t s = 0;
  if constexpr (BITS == 4) {
    for (int j = 0; j < QK / 2; ++j) {
      s += (int32_t)((c[j] & 15) - 8) * q[j];
      s += (int32_t)((c[j] >> 4) - 8) * q[j + QK / 2];
    }
  } else {
    const int8_t* w = reinterpret_cast<const int8_t*>(c);
    for (int j = 0; j < QK; ++j) s += (int32_t)w[j] * q[j];
  }
  return s;
}

template <int BITS, class T>
void rows_portable(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group, const int8_t* xq,
                   const float* dx, int64_t M, T* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t nb = K / QK, rowbytes = K * BITS / 8, ng = K / group, bpb = QK * BITS / 8;
  static thread_local Scratch scratch;
  float* wb = scratch.get<float>(nb);
  for (int64_t n = n0; n < n1; ++n) {
    expand_scales(scales + n * ng, ng, group / QK, nb, wb);
    const uint8_t* row = codes + n * rowbytes;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b)
        acc += (float)block_dot<BITS>(row + b * bpb, xq + m * K + b * QK) * (wb[b] * dx[m * nb + b]);
      store_out(y + m * N + n, acc);
    }
  }
}

#if FERRY_ISA_LEVEL >= 1
// ---------------------------------------------------------------------------------------------------------
// Vector paths. A step covers W bytes of one weight row (W = vector bytes: int8 W inputs, int4 2W inputs).
// x is packed per step and row of x into a record of 4W bytes: [operand a | operand b | int32 start value |
// float scale per lane], laid out so the integer product of the unpacked codes with a (and b) leaves the
// dot product of one block in each group of lanes (int4: 4 lanes per block; int8: 8 lanes per block).
//   int4: block j of the step: a = q[j*32 + 0..15] (low nibbles), b = q[j*32 + 16..31] (high nibbles);
//   int8: a = q[0..W) of the step.
// The start value is -off x (sum of the lane's 4 (int8) or 8 (int4) q values): the codes are multiplied as
// unsigned (int4: u = w + 8, off 8; int8 VNNI: w + 128, off 128), this takes the offset back out. The sign-
// trick int8 paths (no VNNI) multiply |w| by sign(w) q and start at 0.
// ---------------------------------------------------------------------------------------------------------
struct Layout {
  int W;      // bytes of codes per step
  int bits;   // 4 or 8
  int off;    // code offset removed through the start value (0: none)
  constexpr int bps() const { return bits == 4 ? W / 16 : W / 32; }  // blocks per step
  constexpr int lanes_per_block() const { return bits == 4 ? 4 : 8; }
};

// Record of x row m for every step: rec(s) = xp + (s * MT + m) * 4W inside its tile.
void pack_x(const int8_t* xq, const float* dx, int64_t M, int64_t K, int64_t MT, Layout L, int8_t* xp) {
  const int W = L.W, bps = L.bps(), lpb = L.lanes_per_block();
  const int64_t nb = K / QK, steps = (K * L.bits / 8 + W - 1) / W;
  std::memset(xp, 0, (size_t)M * steps * 4 * W);
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    int8_t* tile = xp + m0 * steps * 4 * W;
    for (int64_t m = 0; m < mt; ++m) {
      const int8_t* q = xq + (m0 + m) * K;
      const float* d = dx + (m0 + m) * nb;
      for (int64_t s = 0; s < steps; ++s) {
        int8_t* rec = tile + (s * mt + m) * 4 * W;
        int8_t *a = rec, *b = rec + W;
        int32_t* start = reinterpret_cast<int32_t*>(rec + 2 * W);
        float* sc = reinterpret_cast<float*>(rec + 3 * W);
        for (int j = 0; j < bps; ++j) {
          const int64_t blk = s * bps + j;
          if (blk >= nb) break;
          if (L.bits == 4) {
            std::memcpy(a + j * 16, q + blk * QK, 16);
            std::memcpy(b + j * 16, q + blk * QK + 16, 16);
          } else {
            std::memcpy(a + j * QK, q + blk * QK, QK);
          }
          for (int l = j * lpb; l < (j + 1) * lpb; ++l) sc[l] = d[blk];
        }
        for (int l = 0; l < W / 4; ++l) {
          int32_t sum = 0;
          for (int t = 0; t < 4; ++t) sum += a[4 * l + t] + (L.bits == 4 ? b[4 * l + t] : 0);
          start[l] = -L.off * sum;
        }
      }
    }
  }
}
#endif

#if FERRY_ISA_LEVEL >= 1
// ---- AVX2 (256-bit) ---------------------------------------------------------------------------------------
struct Avx2 {
  static constexpr int W = 32;
  using F = __m256;
  using I = __m256i;
  static F zero() { return _mm256_setzero_ps(); }
  static I load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I load_tail(const uint8_t* p, int n) {
    alignas(32) uint8_t buf[32] = {0};
    std::memcpy(buf, p, n);
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F loadf(const void* p) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p)); }
  static float hsum(F v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
  }
  static I ones16() { return _mm256_set1_epi16(1); }
};

// int4: step = 2 blocks (32 bytes); lanes 0-3 block 0, 4-7 block 1.
struct Q4Avx2 : Avx2 {
  static constexpr Layout L{32, 4, 8};
  struct U { I lo, hi; };
  static U unpack(I c) {
    const I m = _mm256_set1_epi8(15);
    return {_mm256_and_si256(c, m), _mm256_and_si256(_mm256_srli_epi16(c, 4), m)};
  }
  static I dot(const U& u, const int8_t* rec) {
    const I s16 = _mm256_add_epi16(_mm256_maddubs_epi16(u.lo, load(rec)), _mm256_maddubs_epi16(u.hi, load(rec + W)));
    return _mm256_add_epi32(_mm256_madd_epi16(s16, ones16()), load(rec + 2 * W));
  }
  static F wscale(const float* wb) {  // 2 block scales -> lanes [s0 x4, s1 x4]
    const __m256 v = _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(wb))));
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
  }
};

// int8: step = 1 block (32 bytes); llama.cpp's sign trick, no start value.
struct Q8Avx2 : Avx2 {
  static constexpr Layout L{32, 8, 0};
  struct U { I a, c; };
  static U unpack(I c) { return {_mm256_abs_epi8(c), c}; }
  static I dot(const U& u, const int8_t* rec) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u.a, _mm256_sign_epi8(load(rec), u.c)), ones16());
  }
  static F wscale(const float* wb) { return _mm256_broadcast_ss(wb); }
};
#endif

#if FERRY_ISA_LEVEL >= 2
// ---- AVX-512 (512-bit) -------------------------------------------------------------------------------------
struct Avx512 {
  static constexpr int W = 64;
  using F = __m512;
  using I = __m512i;
  static F zero() { return _mm512_setzero_ps(); }
  static I load(const void* p) { return _mm512_loadu_si512(p); }
  static I load_tail(const uint8_t* p, int n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~0ull : ((1ull << n) - 1ull), p);
  }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F loadf(const void* p) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p)); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static I ones16() { return _mm512_set1_epi16(1); }
  static F expand4(const float* wb) {  // 4 block scales -> lanes [s0 x4, s1 x4, s2 x4, s3 x4]
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(_mm_loadu_ps(wb)));
  }
  static F expand2(const float* wb) {  // 2 block scales -> lanes [s0 x8, s1 x8]
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                 _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(wb)))));
  }
};

struct Q4Avx512 : Avx512 {  // step = 4 blocks (64 bytes)
  static constexpr Layout L{64, 4, 8};
  struct U { I lo, hi; };
  static U unpack(I c) {
    const I m = _mm512_set1_epi8(15);
    return {_mm512_and_si512(c, m), _mm512_and_si512(_mm512_srli_epi16(c, 4), m)};
  }
  static I dot(const U& u, const int8_t* rec) {
    const I s16 = _mm512_add_epi16(_mm512_maddubs_epi16(u.lo, load(rec)), _mm512_maddubs_epi16(u.hi, load(rec + W)));
    return _mm512_add_epi32(_mm512_madd_epi16(s16, ones16()), load(rec + 2 * W));
  }
  static F wscale(const float* wb) { return expand4(wb); }
};

struct Q8Avx512 : Avx512 {  // step = 2 blocks (64 bytes); |w| x sign(w) q
  static constexpr Layout L{64, 8, 0};
  struct U { I a; __mmask64 neg; };
  static U unpack(I c) { return {_mm512_abs_epi8(c), _mm512_movepi8_mask(c)}; }
  static I dot(const U& u, const int8_t* rec) {
    const I x = load(rec);
    const I sx = _mm512_mask_sub_epi8(x, u.neg, _mm512_setzero_si512(), x);
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u.a, sx), ones16());
  }
  static F wscale(const float* wb) { return expand2(wb); }
};
#endif

#if FERRY_ISA_LEVEL >= 3
#define FERRY_VNNI __attribute__((target("avx512vnni")))
struct Q4Vnni : Avx512 {
  static constexpr Layout L{64, 4, 8};
  using U = Q4Avx512::U;
  static U unpack(I c) { return Q4Avx512::unpack(c); }
  FERRY_VNNI static I dot(const U& u, const int8_t* rec) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(load(rec + 2 * W), u.lo, load(rec)), u.hi, load(rec + W));
  }
  static F wscale(const float* wb) { return expand4(wb); }
};

struct Q8Vnni : Avx512 {  // w + 128 (unsigned) x q, minus 128 x sum(q)
  static constexpr Layout L{64, 8, 128};
  struct U { I u; };
  static U unpack(I c) { return {_mm512_xor_si512(c, _mm512_set1_epi8((char)0x80))}; }
  FERRY_VNNI static I dot(const U& u, const int8_t* rec) {
    return _mm512_dpbusd_epi32(load(rec + 2 * W), u.u, load(rec));
  }
  static F wscale(const float* wb) { return expand2(wb); }
};
#define FERRY_TGT_VEC FERRY_VNNI
#else
#define FERRY_TGT_VEC
#endif

#if FERRY_ISA_LEVEL >= 1
#ifndef FERRY_QPF
#define FERRY_QPF 512  // bytes ahead in each weight row
#endif

// MB rows of x against RB consecutive weight rows, all of K. out[m * RB + r].
template <class P, int MB, int RB>
FERRY_TGT_VEC __attribute__((always_inline)) inline void micro(const uint8_t* __restrict w, int64_t rowbytes,
                                                               const float* __restrict wb, int64_t wb_stride,
                                                               const int8_t* __restrict xp, int64_t steps,
                                                               bool prefetch, float* out) {
  constexpr int W = P::W, BPS = P::L.bps();
  typename P::F acc[MB * RB];
#pragma GCC unroll 64
  for (int i = 0; i < MB * RB; ++i) acc[i] = P::zero();
  const int64_t full = rowbytes / W;
  for (int64_t s = 0; s < steps; ++s) {
    typename P::U u[RB];
    typename P::F ws[RB];
    if (s < full) {
      if (prefetch) {
#pragma GCC unroll 16
        for (int r = 0; r < RB; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * rowbytes + s * W + FERRY_QPF), _MM_HINT_T0);
      }
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) u[r] = P::unpack(P::load(w + r * rowbytes + s * W));
    } else {
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r) u[r] = P::unpack(P::load_tail(w + r * rowbytes + s * W, (int)(rowbytes - s * W)));
    }
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) ws[r] = P::wscale(wb + r * wb_stride + s * BPS);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const int8_t* rec = xp + (s * MB + m) * 4 * W;
      const typename P::F xs = P::loadf(rec + 3 * W);
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r)
        acc[m * RB + r] = P::fma(P::cvt(P::dot(u[r], rec)), P::mul(ws[r], xs), acc[m * RB + r]);
    }
  }
#pragma GCC unroll 64
  for (int i = 0; i < MB * RB; ++i) out[i] = P::hsum(acc[i]);
}

// Weight rows [n0, n0 + RB) against all M rows of x, MT at a time.
template <class P, int MT, int RB, class T>
FERRY_TGT_VEC void row_block(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group,
                             const int8_t* xp, int64_t M, T* y, int64_t N, int64_t n0, float* wb) {
  constexpr int W = P::W, BPS = P::L.bps();
  const int64_t rowbytes = K * P::L.bits / 8, steps = (rowbytes + W - 1) / W, ng = K / group;
  const int64_t wb_stride = steps * BPS + 4;
  for (int r = 0; r < RB; ++r) expand_scales(scales + (n0 + r) * ng, ng, group / QK, wb_stride, wb + r * wb_stride);
  const uint8_t* w = codes + n0 * rowbytes;
  float out[MT * RB];
  for (int64_t m0 = 0; m0 < M; m0 += MT) {
    const int64_t mt = std::min<int64_t>(MT, M - m0);
    const int8_t* xt = xp + m0 * steps * 4 * W;
    switch (mt) {
#define FERRY_CASE(MBV) \
  case MBV:             \
    if constexpr (MBV <= MT) micro<P, MBV, RB>(w, rowbytes, wb, wb_stride, xt, steps, m0 == 0, out); \
    break;
      FERRY_CASE(1) FERRY_CASE(2) FERRY_CASE(3) FERRY_CASE(4)
#undef FERRY_CASE
      default:
        break;
    }
    for (int64_t m = 0; m < mt; ++m)
      for (int r = 0; r < RB; ++r) store_out(y + (m0 + m) * N + n0 + r, out[m * RB + r]);
  }
}

template <class P, int MT, int RB, class T>
void launch_vec(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group, const int8_t* xq,
                const float* dx, int64_t M, T* y, int64_t N) {
  constexpr int W = P::W;
  const int64_t rowbytes = K * P::L.bits / 8, steps = (rowbytes + W - 1) / W;
  static thread_local Scratch xs;
  int8_t* xp = xs.get<int8_t>((size_t)M * steps * 4 * W + 64);
  pack_x(xq, dx, M, K, MT, P::L, xp);
  const int64_t nblocks = (N + RB - 1) / RB, nfull = N / RB;
  const int64_t grain = std::max<int64_t>(1, 65536 / (rowbytes * RB));  // >= 64 KB of codes per task
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    static thread_local Scratch ws;
    float* wb = ws.get<float>(RB * (steps * P::L.bps() + 4));
    for (int64_t b = b0; b < b1; ++b) {
      if (b < nfull) {
        row_block<P, MT, RB>(codes, scales, K, group, xp, M, y, N, b * RB, wb);
      } else {
        for (int64_t n = nfull * RB; n < N; ++n)
          row_block<P, MT, 1>(codes, scales, K, group, xp, M, y, N, n, wb);
      }
    }
  });
}

template <class P, class T>
void dispatch_vec(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group, const int8_t* xq,
                  const float* dx, int64_t M, T* y, int64_t N) {
  if (M == 1) launch_vec<P, 1, 4>(codes, scales, K, group, xq, dx, M, y, N);
  else if (M == 2) launch_vec<P, 2, 4>(codes, scales, K, group, xq, dx, M, y, N);
  else launch_vec<P, 4, 3>(codes, scales, K, group, xq, dx, M, y, N);
}
#endif

// The path this build runs on this CPU.
enum class Path { PORTABLE = 0, AVX2 = 1, AVX512 = 2, VNNI = 3 };

Path detect_path() {
#if FERRY_ISA_LEVEL >= 1
  __builtin_cpu_init();
#endif
#if FERRY_ISA_LEVEL >= 3
  if (__builtin_cpu_supports("avx512vnni")) return Path::VNNI;
#endif
#if FERRY_ISA_LEVEL >= 2
  return Path::AVX512;
#elif FERRY_ISA_LEVEL >= 1
  return Path::AVX2;
#else
  return Path::PORTABLE;
#endif
}

Path path() {
  static const Path p = detect_path();
  return p;
}

template <int BITS, class T>
void run(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group, const int8_t* xq,
         const float* dx, int64_t M, T* y, int64_t N) {
  switch (path()) {
#if FERRY_ISA_LEVEL >= 3
    case Path::VNNI:
      if constexpr (BITS == 4) return dispatch_vec<Q4Vnni>(codes, scales, K, group, xq, dx, M, y, N);
      else return dispatch_vec<Q8Vnni>(codes, scales, K, group, xq, dx, M, y, N);
#endif
#if FERRY_ISA_LEVEL >= 2
    case Path::AVX512:
      if constexpr (BITS == 4) return dispatch_vec<Q4Avx512>(codes, scales, K, group, xq, dx, M, y, N);
      else return dispatch_vec<Q8Avx512>(codes, scales, K, group, xq, dx, M, y, N);
#endif
#if FERRY_ISA_LEVEL >= 1
    case Path::AVX2:
      if constexpr (BITS == 4) return dispatch_vec<Q4Avx2>(codes, scales, K, group, xq, dx, M, y, N);
      else return dispatch_vec<Q8Avx2>(codes, scales, K, group, xq, dx, M, y, N);
#endif
    default:
      break;
  }
  const int64_t grain = std::max<int64_t>(1, 65536 / (K * BITS / 8));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    rows_portable<BITS>(codes, scales, K, group, xq, dx, M, y, N, n0, n1);
  });
}

void check_weight(const torch::Tensor& codes, const torch::Tensor& scales, int64_t bits, int64_t group,
                  int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 8, "ferry qgemv: bits must be 4 or 8, not ", bits);
  TORCH_CHECK(codes.device().is_cpu() && scales.device().is_cpu(), "ferry qgemv: CPU tensors only");
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() && scales.dim() == 2 && scales.is_contiguous(),
              "ferry qgemv: codes and scales must be contiguous 2-D tensors");
  TORCH_CHECK(codes.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
              "ferry qgemv: int", bits, " codes must be ", bits == 8 ? "int8" : "uint8");
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "ferry qgemv: scales must be float16");
  TORCH_CHECK(K % QK == 0 && group % QK == 0 && group > 0 && K % group == 0,
              "ferry qgemv: K (", K, ") and the group size (", group, ") must be multiples of 32, the group dividing K");
  TORCH_CHECK(codes.size(1) * (bits == 4 ? 2 : 1) == K && scales.size(0) == codes.size(0) &&
                  scales.size(1) == K / group,
              "ferry qgemv: codes/scales shapes do not match K=", K, " group=", group);
}

}  // namespace

// y [M, N] = x [M, K] @ W.T for W stored as (codes, scales) at `bits` with `group` inputs per scale.
torch::Tensor qlinear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales, int64_t bits,
                      int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "ferry qgemv: x must be a 2-D CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  check_weight(codes, scales, bits, group, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ferry qgemv: x must be float32 or bfloat16, not ", x.scalar_type());
  const torch::Tensor xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  g_kernel_calls.fetch_add(1, std::memory_order_relaxed);
  static thread_local Scratch xq_buf, dx_buf;
  int8_t* xq = xq_buf.get<int8_t>((size_t)M * K);
  float* dx = dx_buf.get<float>((size_t)M * (K / QK));
  const uint8_t* c = static_cast<const uint8_t*>(codes.data_ptr());
  const c10::Half* s = scales.data_ptr<c10::Half>();
  if (x.scalar_type() == at::kFloat) {
    quantize_x(xc.data_ptr<float>(), M, K, xq, dx);
    if (bits == 4) run<4>(c, s, K, group, xq, dx, M, y.data_ptr<float>(), N);
    else run<8>(c, s, K, group, xq, dx, M, y.data_ptr<float>(), N);
  } else {
    using B = c10::BFloat16;
    quantize_x(xc.data_ptr<B>(), M, K, xq, dx);
    if (bits == 4) run<4>(c, s, K, group, xq, dx, M, y.data_ptr<B>(), N);
    else run<8>(c, s, K, group, xq, dx, M, y.data_ptr<B>(), N);
  }
  return y;
}

namespace {

// Weight rows [n0, n1) dequantized into out (row n0 first): code x float16 scale, each product exact in float32
// and rounded once to T. Written so the compiler vectorizes the inner loops at the build's level.
template <int BITS, class T>
void dequant_rows(const uint8_t* codes, const c10::Half* scales, int64_t K, int64_t group, int64_t n0, int64_t n1,
                  T* out) {
  const int64_t ng = K / group, bpg = group / QK;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * K * BITS / 8;
    T* o = out + (n - n0) * K;
    for (int64_t g = 0; g < ng; ++g) {
      const float d = half_to_float(scales[n * ng + g]);
      for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
        T* ob = o + b * QK;
        if constexpr (BITS == 8) {
          const int8_t* c = reinterpret_cast<const int8_t*>(row) + b * QK;
          for (int j = 0; j < QK; ++j) store_out(ob + j, static_cast<float>(c[j]) * d);
        } else {
          const uint8_t* c = row + b * (QK / 2);
          for (int j = 0; j < QK / 2; ++j) {
            store_out(ob + j, static_cast<float>((c[j] & 15) - 8) * d);
            store_out(ob + j + QK / 2, static_cast<float>((c[j] >> 4) - 8) * d);
          }
        }
      }
    }
  }
}

template <class T>
void dequant_parallel(const uint8_t* codes, const c10::Half* scales, int64_t bits, int64_t K, int64_t group,
                      int64_t n0, int64_t n1, T* out) {
  at::parallel_for(n0, n1, std::max<int64_t>(1, 16384 / K), [&](int64_t a, int64_t b) {
    T* o = out + (a - n0) * K;
    if (bits == 8) dequant_rows<8>(codes, scales, K, group, a, b, o);
    else dequant_rows<4>(codes, scales, K, group, a, b, o);
  });
}

// x [M, K] rounded as the kernel rounds it (Q8_0: q x d, in float32, then stored as O), rows in parallel.
template <class T, class O>
void round_x(const T* x, int64_t M, int64_t K, O* xr) {
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
    int8_t q[QK];
    float d;
    for (int64_t i = m0 * (K / QK); i < m1 * (K / QK); ++i) {
      quantize_block(x + i * QK, q, &d);
      for (int j = 0; j < QK; ++j) store_out(xr + i * QK + j, static_cast<float>(q[j]) * d);
    }
  });
}

// qmatmul in T (float32 or bfloat16): x rounded, W a tile of NT rows at a time, torch's matmul per tile.
template <class T>
void qmatmul_in(const torch::Tensor& xc, const uint8_t* c, const c10::Half* s, int64_t bits, int64_t group,
                torch::Tensor& y) {
  const int64_t M = xc.size(0), K = xc.size(1), N = y.size(1);
  auto opts = xc.options();
  auto xr = torch::empty({M, K}, opts);
  round_x(xc.data_ptr<T>(), M, K, xr.data_ptr<T>());
  const int64_t NT = std::min<int64_t>(N, std::max<int64_t>(64, (4 << 20) / (K * (int64_t)sizeof(T))));
  static thread_local Scratch tile_buf;
  T* tile = tile_buf.get<T>((size_t)NT * K);
  for (int64_t n0 = 0; n0 < N; n0 += NT) {
    const int64_t nt = std::min(NT, N - n0);
    dequant_parallel(c, s, bits, K, group, n0, n0 + nt, tile);
    auto w = torch::from_blob(tile, {nt, K}, opts);
    auto yt = y.narrow(1, n0, nt);  // row stride N
    if constexpr (std::is_same_v<T, float>) at::mm_out(yt, xr, w.t());  // BLAS writes it in place (ldc)
    else yt.copy_(at::mm(xr, w.t()));  // oneDNN's bfloat16 matmul wants a contiguous output
  }
}

}  // namespace

// W [N, K] = codes x scales written into out (float32 or bfloat16), in parallel over rows.
torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& scales, int64_t bits, int64_t group,
                         torch::Tensor out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == codes.size(0),
              "ferry qgemv: out must be a contiguous [N, K] tensor");
  const int64_t N = out.size(0), K = out.size(1);
  check_weight(codes, scales, bits, group, K);
  const uint8_t* c = static_cast<const uint8_t*>(codes.data_ptr());
  const c10::Half* s = scales.data_ptr<c10::Half>();
  if (out.scalar_type() == at::kFloat) dequant_parallel(c, s, bits, K, group, 0, N, out.data_ptr<float>());
  else if (out.scalar_type() == at::kBFloat16) dequant_parallel(c, s, bits, K, group, 0, N, out.data_ptr<c10::BFloat16>());
  else TORCH_CHECK(false, "ferry qgemv: dequantize writes float32 or bfloat16, not ", out.scalar_type());
  return out;
}

// y [M, N] = round(x) @ W.T for many rows (prefill), in x's dtype: x rounded as the small-M kernel rounds it, W
// dequantized a tile of rows at a time (about 4 MB, still in cache when read) into a scratch tile reused across
// calls, each tile's product by torch's matmul written into y's columns. float32 x: codes x float16 scales are
// exact, so a token's result matches the small-M kernel's up to float rounding whatever the batch. bfloat16 x
// (sent only where the CPU has native bf16, qgemv.py): x and W rounded once more to bfloat16, as a bfloat16
// model's prefill (F.linear) is, for the CPU's bf16 matmul (AMX / AVX512-BF16: ~5x float32's at M=512 here).
torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales, int64_t bits,
                      int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "ferry qgemv: x must be a 2-D CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0);
  check_weight(codes, scales, bits, group, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "ferry qgemv: x must be float32 or bfloat16, not ", x.scalar_type());
  const torch::Tensor xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const uint8_t* c = static_cast<const uint8_t*>(codes.data_ptr());
  const c10::Half* s = scales.data_ptr<c10::Half>();
  if (x.scalar_type() == at::kFloat) qmatmul_in<float>(xc, c, s, bits, group, y);
  else qmatmul_in<c10::BFloat16>(xc, c, s, bits, group, y);
  return y;
}

std::string path_name() {
  static const char* names[] = {"portable", "avx2", "avx512", "avx512_vnni"};
  return names[static_cast<int>(path())];
}

int64_t kernel_calls() { return g_kernel_calls.load(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "y = x @ W.T for a stored int8/int4 weight (small M)", py::arg("x"),
        py::arg("codes"), py::arg("scales"), py::arg("bits"), py::arg("group"));
  m.def("qmatmul", &qmatmul, "y = round(x) @ W.T for many rows: W dequantized per tile, float32 matmul",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("bits"), py::arg("group"));
  m.def("dequantize", &dequantize, "W written into out", py::arg("codes"), py::arg("scales"), py::arg("bits"),
        py::arg("group"), py::arg("out"));
  m.def("path", &path_name, "the code path this build runs here");
  m.def("kernel_calls", &kernel_calls, "number of qlinear calls (tests)");
}
