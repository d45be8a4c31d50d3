// Weight-only int8 / int4 matrix products for XLA:CPU, called through jax.ffi.
//
//   y[m, n] = sum_g ( s[g, n] * sum_{k in g} x[m, k] * q[k, n]  +  o[g, n] * sum_{k in g} x[m, k] )
//
// x: float32 (M, K). q: the integer weight, int8 values or int4 values packed two per byte
// along K (jaxmem.ops.pack_ints: the even k in the low nibble, sign-extended). s, o: float32
// scales and offsets per group of `group` consecutive k (group == K: per output channel).
// Two layouts of the weight:
//   "kn" (a Dense kernel, contracted on axis 0): q (K, N) int8 or (K/2, N) uint8, s/o (G, N);
//   "nk" (a tied LM head x @ E.T, contracted on axis 1): q (N, K) or (N, K/2), s/o (N, G).
// Accumulation is float32 in k order within a group (vector lanes reorder the sum for "nk"):
// the result is within float32 rounding of the dequantize-then-dot reference, which the tests
// pin.
//
// exact: x holds integers and each group's products sum exactly in float32 (W8A8 at decode:
// rounded activations |x| <= 127, int8 weights, groups of <= 1040 k, so every partial sum is an
// integer below 2**24); the group sums are then added in int32 and s / o are not read:
// y = float(sum_k x[m, k] q[k, n]), the int32 sum of XLA's s8 dot, converted as it converts.
//
// Decode-shaped products (M small) read 1 (int8) or 0.5 (int4) bytes per weight instead of
// XLA's 4 (float32). Where the weight sits in cache, the instructions that turn bytes into
// float32 lanes bound the float kernels (measured on AVX-512 CPUs), not memory: hence the VNNI
// route below, 64 products per instruction on the bytes as they are.
//
// AVX-512 VNNI CPUs run kn products of a few rows on vpdpbusd instead, with x split into int8
// pieces (see the vnni namespace): within 6.2e-8 of each row's max |x| per element, and exact
// mode bit for bit.
//
// The ISA is chosen at run time (AVX-512 VNNI > AVX-512 > AVX2+FMA > portable C), capped by
// jaxmem_set_max_isa (jaxmem passes XLA's --xla_cpu_max_isa and $JAXMEM_NATIVE_ISA through
// it). Columns (kn) or rows (nk) are split over XLA's intra-op thread pool.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define JAXMEM_X86 1
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

struct Problem {
  const float* x;
  const uint8_t* q;  // int8 values or packed int4 bytes
  const float* s;
  const float* o;  // nullptr: symmetric
  float* y;
  int64_t M, K, N, group;
  int bits;  // 8 or 4
  bool exact;  // integer x: group sums added in int32, no scales (see the top of the file)
};

inline int NibbleLo(uint8_t b) { return static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4; }
inline int NibbleHi(uint8_t b) { return static_cast<int8_t>(b) >> 4; }

inline float Weight(const Problem& p, int64_t k, int64_t n, bool nk) {
  if (p.bits == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(p.q);
    return static_cast<float>(nk ? q[n * p.K + k] : q[k * p.N + n]);
  }
  uint8_t b = nk ? p.q[n * (p.K / 2) + k / 2] : p.q[(k / 2) * p.N + n];
  return static_cast<float>((k & 1) ? NibbleHi(b) : NibbleLo(b));
}

// Portable C: any CPU, and the column / row tails of the vector kernels.
void PortableRange(const Problem& p, bool nk, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t G = p.K / p.group;
  for (int64_t m = m0; m < m1; ++m) {
    const float* x = p.x + m * p.K;
    for (int64_t n = n0; n < n1; ++n) {
      float out = 0.f;
      int32_t exact = 0;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f, xs = 0.f;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) {
          acc += x[k] * Weight(p, k, n, nk);
          xs += x[k];
        }
        if (p.exact) {
          exact = static_cast<int32_t>(static_cast<uint32_t>(exact) +  // wraps as XLA's s32 dot
                                       static_cast<uint32_t>(static_cast<int32_t>(acc)));
          continue;
        }
        const int64_t si = nk ? n * G + g : g * p.N + n;
        out += acc * p.s[si];
        if (p.o) out += xs * p.o[si];
      }
      p.y[m * p.N + n] = p.exact ? static_cast<float>(exact) : out;
    }
  }
}

// Sums of x over each group (the offset term), [M][G].
std::vector<float> GroupSums(const Problem& p) {
  const int64_t G = p.K / p.group;
  std::vector<float> xs(p.o ? p.M * G : 0);
  if (!p.o) return xs;
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float t = 0.f;
      for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k) t += p.x[m * p.K + k];
      xs[m * G + g] = t;
    }
  return xs;
}

}  // namespace

// --------------------------------------------------------------------------- vector kernels
// One body, compiled once per ISA: the traits struct V gives the lane width and the few
// operations the kernels use.
#define JAXMEM_KERNEL_BODY                                                                       \
  /* kn: a tile of NV vectors of output columns, MB rows of x at a time. */                       \
  template <int MB, int NV>                                                                      \
  void KnTile(const Problem& p, const float* xs, int64_t m0, int64_t n0) {                      \
    constexpr int W = V::kWidth;                                                                 \
    const int64_t G = p.K / p.group;                                                             \
    typename V::F out[MB][NV], acc[MB][NV];                                                      \
    for (int i = 0; i < MB; ++i)                                                                 \
      for (int j = 0; j < NV; ++j) out[i][j] = V::Zero();                                        \
    for (int64_t g = 0; g < G; ++g) {                                                            \
      for (int i = 0; i < MB; ++i)                                                               \
        for (int j = 0; j < NV; ++j) acc[i][j] = V::Zero();                                      \
      const int64_t kb = g * p.group, ke = kb + p.group;                                         \
      if (p.bits == 8) {                                                                         \
        const int8_t* q = reinterpret_cast<const int8_t*>(p.q) + n0;                             \
        for (int64_t k = kb; k < ke; ++k) {                                                      \
          typename V::F w[NV];                                                                   \
          for (int j = 0; j < NV; ++j) w[j] = V::LoadI8(q + k * p.N + j * W);                    \
          for (int i = 0; i < MB; ++i) {                                                         \
            typename V::F xb = V::Set1(p.x[(m0 + i) * p.K + k]);                                 \
            for (int j = 0; j < NV; ++j) acc[i][j] = V::Fma(xb, w[j], acc[i][j]);                \
          }                                                                                      \
        }                                                                                        \
      } else {                                                                                   \
        const uint8_t* q = p.q + n0;                                                             \
        /* odd k into a second accumulator where a tile has too few FMA chains of its own */   \
        constexpr bool kTwo = MB * NV < 8;                                                       \
        typename V::F acc1[kTwo ? MB : 1][kTwo ? NV : 1];                                        \
        for (int i = 0; i < (kTwo ? MB : 1); ++i)                                                \
          for (int j = 0; j < (kTwo ? NV : 1); ++j) acc1[i][j] = V::Zero();                      \
        for (int64_t k = kb; k < ke; k += 2) {                                                   \
          typename V::F lo[NV], hi[NV];                                                          \
          for (int j = 0; j < NV; ++j) V::LoadU4(q + (k / 2) * p.N + j * W, &lo[j], &hi[j]);     \
          for (int i = 0; i < MB; ++i) {                                                         \
            typename V::F x0 = V::Set1(p.x[(m0 + i) * p.K + k]);                                 \
            typename V::F x1 = V::Set1(p.x[(m0 + i) * p.K + k + 1]);                             \
            for (int j = 0; j < NV; ++j) {                                                       \
              acc[i][j] = V::Fma(x0, lo[j], acc[i][j]);                                          \
              if constexpr (kTwo) acc1[i][j] = V::Fma(x1, hi[j], acc1[i][j]);                    \
              else acc[i][j] = V::Fma(x1, hi[j], acc[i][j]);                                     \
            }                                                                                    \
          }                                                                                      \
        }                                                                                        \
        if constexpr (kTwo)                                                                      \
          for (int i = 0; i < MB; ++i)                                                           \
            for (int j = 0; j < NV; ++j) acc[i][j] = V::Add(acc[i][j], acc1[i][j]);              \
      }                                                                                          \
      if (p.exact) { /* the int32 running sums live in out's bits */                             \
        for (int i = 0; i < MB; ++i)                                                             \
          for (int j = 0; j < NV; ++j) out[i][j] = V::AddExact(out[i][j], acc[i][j]);            \
        continue;                                                                                \
      }                                                                                          \
      for (int j = 0; j < NV; ++j) {                                                             \
        typename V::F s = V::Load(p.s + g * p.N + n0 + j * W);                                   \
        typename V::F o = p.o ? V::Load(p.o + g * p.N + n0 + j * W) : V::Zero();                 \
        for (int i = 0; i < MB; ++i) {                                                           \
          out[i][j] = V::Fma(acc[i][j], s, out[i][j]);                                           \
          if (p.o) out[i][j] = V::Fma(V::Set1(xs[(m0 + i) * G + g]), o, out[i][j]);              \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    for (int i = 0; i < MB; ++i)                                                                 \
      for (int j = 0; j < NV; ++j)                                                               \
        V::Store(p.y + (m0 + i) * p.N + n0 + j * W, p.exact ? V::FromExact(out[i][j]) : out[i][j]); \
  }                                                                                              \
                                                                                                 \
  template <int NV>                                                                              \
  void KnRows(const Problem& p, const float* xs, int64_t m0, int64_t m1, int64_t n0) {          \
    int64_t m = m0;                                                                              \
    for (; m + 4 <= m1; m += 4) KnTile<4, NV>(p, xs, m, n0);                                     \
    switch (m1 - m) {                                                                            \
      case 3: KnTile<3, NV>(p, xs, m, n0); break;                                                \
      case 2: KnTile<2, NV>(p, xs, m, n0); break;                                                \
      case 1: KnTile<1, NV>(p, xs, m, n0); break;                                                \
      default: break;                                                                            \
    }                                                                                            \
  }                                                                                              \
                                                                                                 \
  /* Columns [n0, n1) of every row; n0 is a multiple of the lane width. */                       \
  void Kn(const Problem& p, const float* xs, int64_t n0, int64_t n1) {                          \
    constexpr int W = V::kWidth;                                                                 \
    int64_t n = n0;                                                                              \
    if (p.M == 1) /* decode: 8 vectors of columns, 8 independent FMA chains */                  \
      for (; n + 8 * W <= n1; n += 8 * W) KnTile<1, 8>(p, xs, 0, n);                             \
    /* V::kRowVecs vectors of columns x 4 rows: a tile's accumulators fit the registers */       \
    for (; n + V::kRowVecs * W <= n1; n += V::kRowVecs * W) KnRows<V::kRowVecs>(p, xs, 0, p.M, n); \
    for (; n + W <= n1; n += W) KnRows<1>(p, xs, 0, p.M, n);                                     \
    if (n < n1) PortableRange(p, false, 0, p.M, n, n1);                                          \
  }                                                                                              \
                                                                                                 \
  /* nk: output rows n of the weight, each a dot product over k (vectorized along k). For     */ \
  /* int4, x is read de-interleaved (even k, odd k), matching the nibbles of each byte.        */ \
  template <int MB, int NR>                                                                      \
  void NkTile(const Problem& p, const float* xe, const float* xo, const float* xs, int64_t m0,   \
              int64_t n0) {                                                                      \
    constexpr int W = V::kWidth;                                                                 \
    const int64_t G = p.K / p.group;                                                             \
    typename V::F out[MB][NR], acc[MB][NR];                                                      \
    for (int i = 0; i < MB; ++i)                                                                 \
      for (int r = 0; r < NR; ++r) out[i][r] = V::Zero();                                        \
    float extra[MB][NR] = {};                                                                    \
    for (int64_t g = 0; g < G; ++g) {                                                            \
      for (int i = 0; i < MB; ++i)                                                               \
        for (int r = 0; r < NR; ++r) acc[i][r] = V::Zero();                                      \
      const int64_t kb = g * p.group, ke = kb + p.group;                                         \
      if (p.bits == 8) {                                                                         \
        const int8_t* q = reinterpret_cast<const int8_t*>(p.q);                                  \
        for (int64_t k = kb; k < ke; k += W) {                                                   \
          typename V::F w[NR];                                                                   \
          for (int r = 0; r < NR; ++r) w[r] = V::LoadI8(q + (n0 + r) * p.K + k);                 \
          for (int i = 0; i < MB; ++i) {                                                         \
            typename V::F xv = V::Load(p.x + (m0 + i) * p.K + k);                                \
            for (int r = 0; r < NR; ++r) acc[i][r] = V::Fma(xv, w[r], acc[i][r]);                \
          }                                                                                      \
        }                                                                                        \
      } else {                                                                                   \
        const int64_t half = p.K / 2;                                                            \
        for (int64_t k = kb; k < ke; k += 2 * W) {                                               \
          typename V::F lo[NR], hi[NR];                                                          \
          for (int r = 0; r < NR; ++r) V::LoadU4(p.q + (n0 + r) * half + k / 2, &lo[r], &hi[r]); \
          for (int i = 0; i < MB; ++i) {                                                         \
            typename V::F ev = V::Load(xe + (m0 + i) * half + k / 2);                            \
            typename V::F od = V::Load(xo + (m0 + i) * half + k / 2);                            \
            for (int r = 0; r < NR; ++r) {                                                       \
              acc[i][r] = V::Fma(ev, lo[r], acc[i][r]);                                          \
              acc[i][r] = V::Fma(od, hi[r], acc[i][r]);                                          \
            }                                                                                    \
          }                                                                                      \
        }                                                                                        \
      }                                                                                          \
      if (p.exact) {                                                                             \
        for (int i = 0; i < MB; ++i)                                                             \
          for (int r = 0; r < NR; ++r) out[i][r] = V::AddExact(out[i][r], acc[i][r]);            \
        continue;                                                                                \
      }                                                                                          \
      for (int r = 0; r < NR; ++r) {                                                             \
        typename V::F s = V::Set1(p.s[(n0 + r) * G + g]);                                        \
        for (int i = 0; i < MB; ++i) {                                                           \
          out[i][r] = V::Fma(acc[i][r], s, out[i][r]);                                           \
          if (p.o) extra[i][r] += xs[(m0 + i) * G + g] * p.o[(n0 + r) * G + g];                  \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    for (int i = 0; i < MB; ++i)                                                                 \
      for (int r = 0; r < NR; ++r)                                                               \
        p.y[(m0 + i) * p.N + n0 + r] = p.exact ? static_cast<float>(V::SumExact(out[i][r]))       \
                                               : V::Sum(out[i][r]) + extra[i][r];                \
  }                                                                                              \
                                                                                                 \
  /* Rows [n0, n1) of the weight for every row of x; the group is a multiple of the step. */     \
  void Nk(const Problem& p, const float* xe, const float* xo, const float* xs, int64_t n0,       \
          int64_t n1) {                                                                          \
    int64_t n = n0;                                                                              \
    for (; n + 4 <= n1; n += 4) {                                                                \
      int64_t m = 0;                                                                             \
      for (; m + 2 <= p.M; m += 2) NkTile<2, 4>(p, xe, xo, xs, m, n);                            \
      if (m < p.M) NkTile<1, 4>(p, xe, xo, xs, m, n);                                            \
    }                                                                                            \
    for (; n < n1; ++n)                                                                          \
      for (int64_t m = 0; m < p.M; ++m) NkTile<1, 1>(p, xe, xo, xs, m, n);                       \
  }

#ifdef JAXMEM_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
struct V {
  using F = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kRowVecs = 2;  // 16 ymm registers
  static inline F Zero() { return _mm256_setzero_ps(); }
  static inline F Set1(float a) { return _mm256_set1_ps(a); }
  static inline F Load(const float* a) { return _mm256_loadu_ps(a); }
  static inline void Store(float* a, F v) { _mm256_storeu_ps(a, v); }
  static inline F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F Add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F LoadI8(const int8_t* q) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  // 8 bytes -> 8 low nibbles and 8 high nibbles, sign-extended.
  static inline void LoadU4(const uint8_t* q, F* lo, F* hi) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
    __m256i v = _mm256_cvtepu8_epi32(b);
    *lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
    *hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28));
  }
  static inline float Sum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // exact mode: int32 lanes carried in a float vector's bits; acc holds exact integers.
  static inline F AddExact(F sum, F acc) {
    return _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_castps_si256(sum), _mm256_cvtps_epi32(acc)));
  }
  static inline F FromExact(F sum) { return _mm256_cvtepi32_ps(_mm256_castps_si256(sum)); }
  static inline int32_t SumExact(F sum) {
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_castps_si256(sum));
    return t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
  }
};
JAXMEM_KERNEL_BODY
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma")
namespace avx512 {
struct V {
  using F = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kRowVecs = 4;  // 32 zmm registers
  static inline F Zero() { return _mm512_setzero_ps(); }
  static inline F Set1(float a) { return _mm512_set1_ps(a); }
  static inline F Load(const float* a) { return _mm512_loadu_ps(a); }
  static inline void Store(float* a, F v) { _mm512_storeu_ps(a, v); }
  static inline F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F Add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F LoadI8(const int8_t* q) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  static inline void LoadU4(const uint8_t* q, F* lo, F* hi) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    __m512i v = _mm512_cvtepu8_epi32(b);
    // vpermps reads the low 4 bits of each lane: a 16-entry table of the signed nibble values.
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    *lo = _mm512_permutexvar_ps(v, table);
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
  }
  static inline float Sum(F v) { return _mm512_reduce_add_ps(v); }
  static inline F AddExact(F sum, F acc) {
    return _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_castps_si512(sum), _mm512_cvtps_epi32(acc)));
  }
  static inline F FromExact(F sum) { return _mm512_cvtepi32_ps(_mm512_castps_si512(sum)); }
  static inline int32_t SumExact(F sum) { return _mm512_reduce_add_epi32(_mm512_castps_si512(sum)); }
};
JAXMEM_KERNEL_BODY
}  // namespace avx512
#pragma GCC pop_options

// ----------------------------------------------- AVX-512 VNNI: kn products of a few rows
// vpdpbusd adds, in each int32 lane, the products of 4 unsigned bytes by 4 signed bytes. The
// weight is the unsigned operand: int8 q + 128 (q ^ 0x80) or the int4 nibble + 8 (nibble ^ 8).
// Each lane holds four k of one column, interleaved in registers from four rows of the (K, N)
// weight (int4: four packed rows, 8 k; the even k and the odd k fill two vectors, and x is
// stored to match). The activation is the signed operand: each row of x is split into pieces,
//   x[k] ~= S_0 p_0[k] + S_1 p_1[k] + ... + S_{P-1} p_{P-1}[k],   S_0 = max|x| / 127,
//   S_{i+1} = S_i / 254, so |x - sum| <= S_{P-1} / 2 + float32 rounding of the residuals:
// with P = 3, at most 6.2e-8 max|x| (the tests pin it). Two pieces (1.6e-5 max|x|) were
// measured 1.2e-5 of |x|.|w| off on Gaussian x, beyond float32 rounding, so int4 takes three
// too. Each piece's group sums are exact in int32; the + 128 / + 8 is taken back in int32
// (c sum_k p[k]), then the pieces are combined in float32 with the group's scale and offset.
// Exact mode (integer x in [-128, 127]) is one piece of S = 1, summed in int32 throughout
// (wrapping as XLA's s32 dot), bit for bit.
// Lane order: after the two rounds of unpacks, int32 lane (block b, i) of accumulator v holds
// column 16 b + 4 v + i of the 64-column tile; a 4 x 4 transpose of 128-bit blocks restores it.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vnni,avx2,fma")
namespace vnni {

// acc + the 4-byte dot products of unsigned u and signed s per int32 lane (vpdpbusd), written
// as asm for the GEMM tile: there GCC 12 copied each of the 24 accumulators out and back
// around the intrinsic and spilled them (3.2-4.2x f32 with the asm, 1.5-2.3x without). The
// weight-only tiles keep the intrinsic (the asm was slower there: GCC cannot schedule it).
inline __m512i Dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "vm"(s));
  return acc;
}

constexpr int kPieces = 3;
constexpr int64_t kCols = 64;
// |p| <= 128 times (u8 <= 255) per product: group sums stay below 2**31 for groups up to this.
constexpr int64_t kMaxGroup = 65536;
// Rows of x taken; more rows run on the float kernel, whose tiles of 4 rows share each weight
// it converts (measured on an AVX-512 EPYC: 8 rows of int8 and 4 of int4 on par or faster;
// exact mode shares its weight registers between 4 rows).
inline int64_t MaxRows(const Problem& p) { return p.exact ? 16 : p.bits == 8 ? 8 : 4; }

struct Act {
  int P = 0;
  int lanes = 1;              // kn: 1; nk: 16 (a group's k fall on 16 int32 lanes)
  std::vector<int8_t> piece;  // [M][P][K]
  std::vector<int32_t> bias;  // [M][P][G][lanes]: c * sum over the group (lane) of the piece
  std::vector<float> scale;   // [M][P]
};

// int4: each 8 k of x[k0, k1) as the 4 even then the 4 odd (the nibble order of LoadInt4).
inline void EvenThenOdd(int8_t* x, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; k += 8) {
    int8_t t[8];
    for (int j = 0; j < 4; ++j) t[j] = x[k + 2 * j], t[4 + j] = x[k + 2 * j + 1];
    std::copy(t, t + 8, x + k);
  }
}

// Splits x into pieces; false where the route does not apply (then the caller keeps the
// float kernel): a non-finite or tiny nonzero max|x|, or exact-mode x outside int8.
bool Split(const Problem& p, bool nk, Act* a) {
  const int64_t G = p.K / p.group;
  const int P = p.exact ? 1 : kPieces;
  const int32_t c = p.bits == 8 ? 128 : 8;
  const int L = nk ? 16 : 1;
  a->P = P;
  a->lanes = L;
  a->piece.assign(p.M * P * p.K, 0);
  a->bias.assign(p.M * P * G * L, 0);
  a->scale.assign(p.M * P, 1.f);
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.K;
    int8_t* pc = a->piece.data() + m * P * p.K;
    if (p.exact) {
      for (int64_t k = 0; k < p.K; ++k) {
        if (!(x[k] >= -128.f && x[k] <= 127.f) || x[k] != static_cast<float>(static_cast<int>(x[k])))
          return false;
        pc[k] = static_cast<int8_t>(x[k]);
      }
      if (p.bits == 4) EvenThenOdd(pc, 0, p.K);
    } else {
      __m512 vmax = _mm512_setzero_ps();
      __mmask16 nan = 0;
      int64_t k = 0;
      for (; k + 16 <= p.K; k += 16) {
        const __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + k));
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, v);
      }
      float amax = _mm512_reduce_max_ps(vmax);
      for (; k < p.K; ++k) {
        nan |= std::isnan(x[k]);
        amax = std::max(amax, std::fabs(x[k]));
      }
      if (nan || !(amax <= 3.0e38f) || amax < 1e-20f) return false;  // NaN / inf, 0, subnormal
      float* sc = a->scale.data() + m * P;
      float inv[kPieces];
      sc[0] = amax / 127.f;
      for (int i = 1; i < P; ++i) sc[i] = sc[i - 1] / 254.f;
      for (int i = 0; i < P; ++i) inv[i] = 1.f / sc[i];
      const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
      const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
      for (k = 0; k + 16 <= p.K; k += 16) {
        __m512 r = _mm512_loadu_ps(x + k);
        for (int i = 0; i < P; ++i) {
          __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(r, _mm512_set1_ps(inv[i])),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
          __m512i vi = _mm512_cvtps_epi32(v);
          if (p.bits == 4) vi = _mm512_permutexvar_epi32(order, vi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(pc + i * p.K + k), _mm512_cvtsepi32_epi8(vi));
          r = _mm512_fnmadd_ps(v, _mm512_set1_ps(sc[i]), r);
        }
      }
      const int64_t tail = k;
      for (; k < p.K; ++k) {
        float r = x[k];
        for (int i = 0; i < P; ++i) {
          const float v = std::min(127.f, std::max(-127.f, std::nearbyint(r * inv[i])));
          pc[i * p.K + k] = static_cast<int8_t>(v);
          r = std::fma(-v, sc[i], r);
        }
      }
      if (p.bits == 4)
        for (int i = 0; i < P; ++i) EvenThenOdd(pc + i * p.K, tail, p.K);
    }
    for (int i = 0; i < P; ++i)
      for (int64_t g = 0; g < G; ++g) {
        int32_t* b = a->bias.data() + ((m * P + i) * G + g) * L;
        for (int64_t k = g * p.group; k < (g + 1) * p.group; ++k)
          b[nk ? ((k - g * p.group) / 4) % 16 : 0] += c * pc[i * p.K + k];
      }
  }
  return true;
}

// Four rows of 64 bytes interleaved: w[v] lane (b, i) holds the 4 bytes of column 16 b + 4 v + i.
inline void Interleave(const __m512i r[4], __m512i w[4]) {
  const __m512i t0 = _mm512_unpacklo_epi8(r[0], r[1]), t1 = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i t2 = _mm512_unpacklo_epi8(r[2], r[3]), t3 = _mm512_unpackhi_epi8(r[2], r[3]);
  w[0] = _mm512_unpacklo_epi16(t0, t2);
  w[1] = _mm512_unpackhi_epi16(t0, t2);
  w[2] = _mm512_unpacklo_epi16(t1, t3);
  w[3] = _mm512_unpackhi_epi16(t1, t3);
}

// int8 rows k..k+3 of 64 columns as q + 128.
inline void LoadInt8(const Problem& p, int64_t k, int64_t n0, __m512i w[4]) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i r[4];
  for (int i = 0; i < 4; ++i)
    r[i] = _mm512_xor_si512(_mm512_loadu_si512(p.q + (k + i) * p.N + n0), flip);
  Interleave(r, w);
}

// int4 k..k+7 (packed rows k/2..k/2+3) of 64 columns: lo[v] the even k, hi[v] the odd k,
// as nibble + 8, interleaved before the nibbles are split (half the shuffles of splitting
// first).
inline void LoadInt4(const Problem& p, int64_t k, int64_t n0, __m512i lo[4], __m512i hi[4]) {
  const __m512i mask = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(0x08);
  __m512i r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm512_loadu_si512(p.q + (k / 2 + i) * p.N + n0);
  Interleave(r, lo);
  for (int v = 0; v < 4; ++v) {
    hi[v] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(lo[v], 4), mask, bias, 0x6A);
    lo[v] = _mm512_ternarylogic_epi32(lo[v], mask, bias, 0x6A);  // (b & 0x0F) ^ 0x08
  }
}

// In place: t[v] block b (columns 16 b + 4 v ..) -> t[b] = columns 16 b .. 16 b + 15.
inline void Transpose(__m512 t[4]) {
  const __m512 a = _mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 b = _mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512 c = _mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512 d = _mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2));
  t[0] = _mm512_shuffle_f32x4(a, c, _MM_SHUFFLE(2, 0, 2, 0));
  t[1] = _mm512_shuffle_f32x4(a, c, _MM_SHUFFLE(3, 1, 3, 1));
  t[2] = _mm512_shuffle_f32x4(b, d, _MM_SHUFFLE(2, 0, 2, 0));
  t[3] = _mm512_shuffle_f32x4(b, d, _MM_SHUFFLE(3, 1, 3, 1));
}

// Four bytes at x, broadcast to every int32 lane.
inline __m512i Quad(const void* x) {
  int32_t v;
  __builtin_memcpy(&v, x, sizeof(v));
  return _mm512_set1_epi32(v);
}

template <int MB, int P>
void Tile(const Problem& p, const Act& a, const float* xs, int64_t m0, int64_t n0) {
  const int64_t G = p.K / p.group;
  __m512i acc[MB][P][4];
  __m512 out[MB][4];  // float: natural column order; exact: int32 bits, lane order
  for (int i = 0; i < MB; ++i)
    for (int v = 0; v < 4; ++v) out[i][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < P; ++j)
        for (int v = 0; v < 4; ++v) acc[i][j][v] = _mm512_setzero_si512();
    const int64_t kb = g * p.group, ke = kb + p.group;
    if (p.bits == 8) {
      for (int64_t k = kb; k < ke; k += 4) {
        __m512i w[4];
        LoadInt8(p, k, n0, w);
        for (int i = 0; i < MB; ++i)
          for (int j = 0; j < P; ++j) {
            const __m512i xb = Quad(a.piece.data() + ((m0 + i) * P + j) * p.K + k);
            for (int v = 0; v < 4; ++v) acc[i][j][v] = _mm512_dpbusd_epi32(acc[i][j][v], w[v], xb);
          }
      }
    } else {
      for (int64_t k = kb; k < ke; k += 8) {
        __m512i lo[4], hi[4];
        LoadInt4(p, k, n0, lo, hi);
        for (int i = 0; i < MB; ++i)
          for (int j = 0; j < P; ++j) {
            const int8_t* x = a.piece.data() + ((m0 + i) * P + j) * p.K + k;
            const __m512i xe = Quad(x), xo = Quad(x + 4);  // Split stores even k, then odd
            for (int v = 0; v < 4; ++v) {
              acc[i][j][v] = _mm512_dpbusd_epi32(acc[i][j][v], lo[v], xe);
              acc[i][j][v] = _mm512_dpbusd_epi32(acc[i][j][v], hi[v], xo);
            }
          }
      }
    }
    for (int i = 0; i < MB; ++i) {
      const int32_t* bias = a.bias.data() + (m0 + i) * P * G + g;
      if (p.exact) {
        const __m512i b = _mm512_set1_epi32(bias[0]);
        for (int v = 0; v < 4; ++v)
          out[i][v] = _mm512_castsi512_ps(_mm512_add_epi32(
              _mm512_castps_si512(out[i][v]), _mm512_sub_epi32(acc[i][0][v], b)));
        continue;
      }
      __m512 t[4];
      for (int v = 0; v < 4; ++v) {
        t[v] = _mm512_setzero_ps();
        for (int j = 0; j < P; ++j)
          t[v] = _mm512_fmadd_ps(
              _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j][v], _mm512_set1_epi32(bias[j * G]))),
              _mm512_set1_ps(a.scale[(m0 + i) * P + j]), t[v]);
      }
      Transpose(t);
      for (int v = 0; v < 4; ++v) {
        const int64_t si = g * p.N + n0 + 16 * v;
        out[i][v] = _mm512_fmadd_ps(t[v], _mm512_loadu_ps(p.s + si), out[i][v]);
        if (p.o)
          out[i][v] = _mm512_fmadd_ps(_mm512_set1_ps(xs[(m0 + i) * G + g]),
                                      _mm512_loadu_ps(p.o + si), out[i][v]);
      }
    }
  }
  for (int i = 0; i < MB; ++i) {
    if (p.exact) {
      for (int v = 0; v < 4; ++v) out[i][v] = _mm512_cvtepi32_ps(_mm512_castps_si512(out[i][v]));
      Transpose(out[i]);
    }
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(p.y + (m0 + i) * p.N + n0 + 16 * v, out[i][v]);
  }
}

// Columns [n0, n1) of every row, n0 a multiple of 16; tiles of 64, the rest on the float kernel.
void Kn(const Problem& p, const Act& a, const float* xs, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kCols <= n1; n += kCols) {
    int64_t m = 0;
    if (p.exact) {
      for (; m + 4 <= p.M; m += 4) Tile<4, 1>(p, a, xs, m, n);
      for (; m + 2 <= p.M; m += 2) Tile<2, 1>(p, a, xs, m, n);
      if (m < p.M) Tile<1, 1>(p, a, xs, m, n);
    } else {
      for (; m < p.M; ++m) Tile<1, kPieces>(p, a, xs, m, n);
    }
  }
  if (n < n1) avx512::Kn(p, xs, n, n1);
}

// nk (int8): NR rows n of the (N, K) weight against row m of x; each vpdpbusd takes 64
// consecutive k of a row as they lie in memory (no interleave); groups are whole multiples
// of 64. The + 128 is taken back per lane in int32, then the lanes are summed.
template <int NR, int P>
void NkTile(const Problem& p, const Act& a, const float* xs, int64_t m, int64_t n0) {
  const int64_t G = p.K / p.group;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* x = a.piece.data() + m * P * p.K;
  float out[NR] = {};
  uint32_t exact[NR] = {};  // wraps as XLA's s32 dot
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[NR][P];
    for (int r = 0; r < NR; ++r)
      for (int j = 0; j < P; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t k = g * p.group; k < (g + 1) * p.group; k += 64) {
      __m512i xv[P];
      for (int j = 0; j < P; ++j) xv[j] = _mm512_loadu_si512(x + j * p.K + k);
      for (int r = 0; r < NR; ++r) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(p.q + (n0 + r) * p.K + k), flip);
        for (int j = 0; j < P; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], w, xv[j]);
      }
    }
    const int32_t* bias = a.bias.data() + (m * P * G + g) * 16;
    for (int r = 0; r < NR; ++r) {
      if (p.exact) {
        exact[r] += static_cast<uint32_t>(
            _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[r][0], _mm512_loadu_si512(bias))));
        continue;
      }
      __m512 t = _mm512_setzero_ps();
      for (int j = 0; j < P; ++j)
        t = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], _mm512_loadu_si512(bias + j * G * 16))),
            _mm512_set1_ps(a.scale[m * P + j]), t);
      const int64_t si = (n0 + r) * G + g;
      out[r] += _mm512_reduce_add_ps(t) * p.s[si];
      if (p.o) out[r] += xs[m * G + g] * p.o[si];
    }
  }
  for (int r = 0; r < NR; ++r)
    p.y[m * p.N + n0 + r] = p.exact ? static_cast<float>(static_cast<int32_t>(exact[r])) : out[r];
}

// Rows [n0, n1) of the weight for every row of x.
void Nk(const Problem& p, const Act& a, const float* xs, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < p.M; ++m) {
    int64_t n = n0;
    if (p.exact) {
      for (; n + 8 <= n1; n += 8) NkTile<8, 1>(p, a, xs, m, n);
      for (; n < n1; ++n) NkTile<1, 1>(p, a, xs, m, n);
    } else {
      for (; n + 4 <= n1; n += 4) NkTile<4, kPieces>(p, a, xs, m, n);
      for (; n < n1; ++n) NkTile<1, kPieces>(p, a, xs, m, n);
    }
  }
}

}  // namespace vnni

// --------------------------------------------------- AVX-512 VNNI int8 x int8 -> int32 GEMM
// The same exact int32 sums as the AVX2 GEMM (W8A8's products), on vpdpbusd: a + 128 is the
// unsigned operand (broadcast, 4 k of one row), b the signed one, packed once per call into
// panels of 64 columns x 4 k (the interleave of the weight-only route, blocks transposed back
// so lanes are columns in order); c = sum (a + 128) b - 128 sum_k b, wrapping as XLA's s32.
namespace vnni {

constexpr int64_t kGemmCols = 64;
constexpr int kGemmRows = 6;  // 24 accumulators + 4 weight vectors + 1 broadcast
constexpr int64_t kGemmPanelRows = 48;

// Panels [p0, p1) of b (K, N) -> [N/64][K/4][4 vectors of 16 columns][4 k], zero-padded; and
// corr[n] = 128 * sum_k b[k, n].
void PackB(const int8_t* b, int64_t K, int64_t N, int64_t p0, int64_t p1, int8_t* out,
           int32_t* corr) {
  const int64_t k4 = (K + 3) / 4;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t pn = p0; pn < p1; ++pn) {
    const int64_t n0 = pn * kGemmCols;
    __m512i sums[4];
    for (int v = 0; v < 4; ++v) sums[v] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k4; ++j) {
      int8_t* dst = out + (pn * k4 + j) * 256;
      const int64_t k = 4 * j;
      __m512i w[4];
      if (n0 + kGemmCols <= N && k + 3 < K) {
        __m512i r[4];
        for (int i = 0; i < 4; ++i) r[i] = _mm512_loadu_si512(b + (k + i) * N + n0);
        Interleave(r, w);
        __m512 t[4];
        for (int v = 0; v < 4; ++v) t[v] = _mm512_castsi512_ps(w[v]);
        Transpose(t);
        for (int v = 0; v < 4; ++v) w[v] = _mm512_castps_si512(t[v]);
      } else {
        alignas(64) int8_t tmp[256];
        for (int64_t c = 0; c < kGemmCols; ++c)
          for (int i = 0; i < 4; ++i)
            tmp[4 * c + i] = (n0 + c < N && k + i < K) ? b[(k + i) * N + n0 + c] : 0;
        for (int v = 0; v < 4; ++v) w[v] = _mm512_load_si512(tmp + 64 * v);
      }
      for (int v = 0; v < 4; ++v) {
        _mm512_storeu_si512(dst + 64 * v, w[v]);
        sums[v] = _mm512_dpbusd_epi32(sums[v], ones, w[v]);
      }
    }
    for (int v = 0; v < 4; ++v)
      _mm512_storeu_si512(corr + n0 + 16 * v, _mm512_slli_epi32(sums[v], 7));
  }
}

template <int MR>
void GemmTile(const uint8_t* a, int64_t lda, const int8_t* bp, int64_t k4, const int32_t* corr,
              int32_t* c, int64_t ldc, int64_t cols) {
  __m512i acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t j = 0; j < k4; ++j) {
    __m512i w[4];
    for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(bp + j * 256 + 64 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512i av = Quad(a + r * lda + 4 * j);
      for (int v = 0; v < 4; ++v) acc[r][v] = Dpbusd(acc[r][v], av, w[v]);
    }
  }
  __mmask16 mask[4];  // no early exit below: acc stays in registers
  for (int v = 0; v < 4; ++v) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * v));
    mask[v] = static_cast<__mmask16>((1u << left) - 1);
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v)
      _mm512_mask_storeu_epi32(c + r * ldc + 16 * v, mask[v],
                               _mm512_sub_epi32(acc[r][v], _mm512_loadu_si512(corr + 16 * v)));
}

// Rows [m0, m1) of c from a (M, K) int8 and the packed b.
void GemmRows(const int8_t* a, const int8_t* bp, const int32_t* corr, int32_t* c, int64_t K,
              int64_t N, int64_t m0, int64_t m1) {
  const int64_t k4 = (K + 3) / 4, lda = 4 * k4, panels = (N + kGemmCols - 1) / kGemmCols;
  std::vector<uint8_t> rows_u8(kGemmPanelRows * lda, 0x80);  // a + 128; padding k: a = 0
  for (int64_t pm = m0; pm < m1; pm += kGemmPanelRows) {
    const int64_t rows = std::min(kGemmPanelRows, m1 - pm);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k)
        rows_u8[r * lda + k] = static_cast<uint8_t>(a[(pm + r) * K + k]) ^ 0x80;
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int8_t* b = bp + pn * k4 * 256;
      const int32_t* cr = corr + pn * kGemmCols;
      const int64_t n0 = pn * kGemmCols, cols = std::min<int64_t>(kGemmCols, N - n0);
      int64_t r = 0;
      for (; r + kGemmRows <= rows; r += kGemmRows)
        GemmTile<kGemmRows>(rows_u8.data() + r * lda, lda, b, k4, cr, c + (pm + r) * N + n0, N, cols);
      static_assert(kGemmRows == 6, "the row tails below are 1-5 rows");
      const uint8_t* ar = rows_u8.data() + r * lda;
      int32_t* cc = c + (pm + r) * N + n0;
      switch (rows - r) {
        case 5: GemmTile<5>(ar, lda, b, k4, cr, cc, N, cols); break;
        case 4: GemmTile<4>(ar, lda, b, k4, cr, cc, N, cols); break;
        case 3: GemmTile<3>(ar, lda, b, k4, cr, cc, N, cols); break;
        case 2: GemmTile<2>(ar, lda, b, k4, cr, cc, N, cols); break;
        case 1: GemmTile<1>(ar, lda, b, k4, cr, cc, N, cols); break;
        default: break;
      }
    }
  }
}

}  // namespace vnni
#pragma GCC pop_options

// ------------------------------------------------------------------ int8 x int8 -> int32 GEMM
// c[m, n] = sum_k a[m, k] b[k, n], exact in int32 (W8A8's products). AVX2 has no int8 dot
// instruction that takes two signed operands without saturating (vpmaddubsw saturates its
// 16-bit pair sums), so both operands are widened to int16 and multiplied in pairs of k by
// vpmaddwd (16 products per instruction, twice fp32 FMA's 8), the pair sums added in int32.
// b is packed once per call into column panels of 16, k pairs interleaved; a is widened per
// row panel. AVX-512 CPUs run this AVX2 kernel too.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

constexpr int kGemmCols = 16;   // two ymm of int32 per row of a tile
constexpr int kGemmRows = 4;    // 8 accumulators + 2 weight vectors + 1 broadcast (6 rows spill)
constexpr int64_t kPanelRows = 48;

// Panels [p0, p1) of b (K, N) int8 -> [N/16][K/2][16][2] int16, zero-padded to even K and
// whole panels: each k pair of 16 columns interleaved byte-wise, then widened.
void PackB(const int8_t* b, int64_t K, int64_t N, int64_t p0, int64_t p1, int16_t* out) {
  const int64_t kp = (K + 1) / 2;
  for (int64_t pn = p0; pn < p1; ++pn) {
    const int64_t n0 = pn * kGemmCols;
    for (int64_t j = 0; j < kp; ++j) {
      int16_t* dst = out + (pn * kp + j) * kGemmCols * 2;
      const int64_t k = 2 * j;
      if (n0 + kGemmCols <= N && k + 1 < K) {
        const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k * N + n0));
        const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (k + 1) * N + n0));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16),
                            _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
        continue;
      }
      for (int c = 0; c < kGemmCols; ++c) {
        const int64_t n = n0 + c;
        dst[2 * c] = n < N ? b[k * N + n] : 0;
        dst[2 * c + 1] = (n < N && k + 1 < K) ? b[(k + 1) * N + n] : 0;
      }
    }
  }
}

template <int MR>
void GemmTile(const int16_t* a, int64_t lda, const int16_t* bp, int64_t kp, int32_t* c,
              int64_t ldc, int64_t cols) {
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t j = 0; j < kp; ++j) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + j * 32));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + j * 32 + 16));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      __builtin_memcpy(&pair, a + r * lda + 2 * j, sizeof(pair));
      const __m256i av = _mm256_set1_epi32(pair);
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (cols == kGemmCols) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc), acc[r][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + 8), acc[r][1]);
    } else {
      alignas(32) int32_t tmp[kGemmCols];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[r][1]);
      for (int64_t q = 0; q < cols; ++q) c[r * ldc + q] = tmp[q];
    }
  }
}

// Rows [m0, m1) of c from a (M, K) int8 and the packed b.
void GemmRows(const int8_t* a, const int16_t* bp, int32_t* c, int64_t K, int64_t N,
              int64_t m0, int64_t m1) {
  const int64_t kp = (K + 1) / 2, lda = 2 * kp, panels = (N + kGemmCols - 1) / kGemmCols;
  std::vector<int16_t> wide(kPanelRows * lda, 0);
  for (int64_t pm = m0; pm < m1; pm += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, m1 - pm);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) wide[r * lda + k] = a[(pm + r) * K + k];
    for (int64_t pn = 0; pn < panels; ++pn) {
      const int16_t* b = bp + pn * kp * kGemmCols * 2;
      const int64_t n0 = pn * kGemmCols, cols = std::min<int64_t>(kGemmCols, N - n0);
      int64_t r = 0;
      for (; r + kGemmRows <= rows; r += kGemmRows)
        GemmTile<kGemmRows>(wide.data() + r * lda, lda, b, kp, c + (pm + r) * N + n0, N, cols);
      static_assert(kGemmRows == 4, "the row tails below are 1-3 rows");
      switch (rows - r) {
        case 3: GemmTile<3>(wide.data() + r * lda, lda, b, kp, c + (pm + r) * N + n0, N, cols); break;
        case 2: GemmTile<2>(wide.data() + r * lda, lda, b, kp, c + (pm + r) * N + n0, N, cols); break;
        case 1: GemmTile<1>(wide.data() + r * lda, lda, b, kp, c + (pm + r) * N + n0, N, cols); break;
        default: break;
      }
    }
  }
}

}  // namespace avx2
#pragma GCC pop_options
#endif  // JAXMEM_X86

namespace {

std::atomic<int> g_max_isa{kAvx512Vnni};

int DetectIsa() {
#ifdef JAXMEM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
    return __builtin_cpu_supports("avx512vnni") ? kAvx512Vnni : kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

int ActiveIsa() { return std::min(DetectIsa(), g_max_isa.load()); }

// Runs fn(begin, end) over [0, total) in chunks of `align`, on the caller and XLA's pool.
// Parts are claimed from a shared counter, and the caller claims until none is left: it never
// waits for a task that has not started (XLA may run several custom calls at once, each
// caller holding a pool thread, so a scheduled task may start only after its caller returns;
// such a task finds nothing left to claim and touches only the heap-held counters).
template <typename Fn>
void ParallelFor(ffi::ThreadPool* pool, int64_t total, int64_t align, int64_t min_chunk, Fn fn) {
  int64_t threads = pool ? std::max<int64_t>(1, pool->num_threads()) : 1;
  int64_t units = (total + align - 1) / align;
  int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, total / min_chunk));
  parts = std::max<int64_t>(1, std::min(parts, units));
  if (parts == 1) {
    fn(0, total);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  auto range = [&](int64_t i) {
    int64_t b = std::min(total, (units * i / parts) * align);
    int64_t e = std::min(total, (units * (i + 1) / parts) * align);
    if (b < e) fn(b, e);
  };
  std::function<void(int64_t)> work = range;
  auto claim = [parts](Counters* c, const std::function<void(int64_t)>* w) {
    for (int64_t i; (i = c->next.fetch_add(1, std::memory_order_acq_rel)) < parts;) {
      (*w)(i);  // the caller is still waiting for this part: `w` is alive
      c->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  for (int64_t i = 1; i < parts; ++i)
    pool->Schedule([counters, claim, w = &work] { claim(counters.get(), w); });
  claim(counters.get(), &work);
  while (counters->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

ffi::Error Run(ffi::ThreadPool* pool, Problem p, bool nk) {
  if (p.bits != 8 && p.bits != 4) return ffi::Error::InvalidArgument("bits must be 8 or 4");
  if (p.group <= 0 || p.K % p.group != 0 || (p.bits == 4 && p.group % 2 != 0))
    return ffi::Error::InvalidArgument("group must divide K (and be even for int4)");
  if (p.exact) p.o = nullptr;  // no offset term: the caller adds it
  std::vector<float> xs = GroupSums(p);
  const int isa = ActiveIsa();
  if (!nk) {
    const int64_t width = isa >= kAvx512 ? 16 : 8;
#ifdef JAXMEM_X86
    vnni::Act act;
    const bool use_vnni = isa >= kAvx512Vnni && p.group % (p.bits == 8 ? 4 : 8) == 0 &&
                          p.group <= vnni::kMaxGroup && p.M <= vnni::MaxRows(p) &&
                          p.N >= vnni::kCols && vnni::Split(p, false, &act);
#endif
    ParallelFor(pool, p.N, 4 * width, 256, [&](int64_t b, int64_t e) {
#ifdef JAXMEM_X86
      if (use_vnni) return vnni::Kn(p, act, xs.data(), b, e);
      if (isa >= kAvx512) return avx512::Kn(p, xs.data(), b, e);
      if (isa == kAvx2) return avx2::Kn(p, xs.data(), b, e);
#endif
      PortableRange(p, false, 0, p.M, b, e);
    });
    return ffi::Error::Success();
  }
  // nk: the vector step along k is W (int8) or 2W (int4) and must divide the group.
  const int64_t width = isa >= kAvx512 ? 16 : (isa == kAvx2 ? 8 : 0);
  const int64_t step = p.bits == 8 ? width : 2 * width;
  const bool vec = width > 0 && p.group % step == 0;
  std::vector<float> xe, xo;
  if (vec && p.bits == 4) {
    const int64_t half = p.K / 2;
    xe.resize(p.M * half);
    xo.resize(p.M * half);
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t j = 0; j < half; ++j) {
        xe[m * half + j] = p.x[m * p.K + 2 * j];
        xo[m * half + j] = p.x[m * p.K + 2 * j + 1];
      }
  }
#ifdef JAXMEM_X86
  vnni::Act act;
  const bool use_vnni = isa >= kAvx512Vnni && p.bits == 8 && p.group % 64 == 0 &&
                        p.group <= vnni::kMaxGroup && p.M <= vnni::MaxRows(p) &&
                        vnni::Split(p, true, &act);
#endif
  ParallelFor(pool, p.N, 4, 64, [&](int64_t b, int64_t e) {
#ifdef JAXMEM_X86
    if (use_vnni) return vnni::Nk(p, act, xs.data(), b, e);
    if (vec && isa >= kAvx512) return avx512::Nk(p, xe.data(), xo.data(), xs.data(), b, e);
    if (vec && isa == kAvx2) return avx2::Nk(p, xe.data(), xo.data(), xs.data(), b, e);
#endif
    PortableRange(p, true, 0, p.M, b, e);
  });
  return ffi::Error::Success();
}

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer q,
                   ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group, bool nk,
                   bool has_offset, bool exact) {
  auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || q.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("jaxmem_qmatmul: x, q and y must be 2-D");
  Problem p;
  p.x = x.typed_data();
  p.q = reinterpret_cast<const uint8_t*>(q.untyped_data());
  p.s = s.typed_data();
  p.o = has_offset ? o.typed_data() : nullptr;
  p.y = y->typed_data();
  p.M = xd[0];
  p.K = xd[1];
  p.N = yd[1];
  p.group = group;
  p.bits = static_cast<int>(bits);
  p.exact = exact;
  if (yd[0] != p.M) return ffi::Error::InvalidArgument("jaxmem_qmatmul: rows of x and y differ");
  return Run(&pool, p, nk);
}

// Rows [m0, m1) of the int8 GEMM in portable C.
void PortableGemm(const int8_t* a, const int8_t* b, int32_t* c, int64_t K, int64_t N,
                  int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    int32_t* row = c + m * N;
    for (int64_t n = 0; n < N; ++n) row[n] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int32_t v = a[m * K + k];
      const int8_t* bk = b + k * N;
      for (int64_t n = 0; n < N; ++n) row[n] += v * bk[n];
    }
  }
}

ffi::Error I8Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> a, ffi::Buffer<ffi::S8> b,
                  ffi::ResultBuffer<ffi::S32> c) {
  auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  if (ad.size() != 2 || bd.size() != 2 || cd.size() != 2 || ad[1] != bd[0] || cd[0] != ad[0] ||
      cd[1] != bd[1])
    return ffi::Error::InvalidArgument("jaxmem_i8gemm: expected a (M, K), b (K, N), c (M, N)");
  const int64_t M = ad[0], K = ad[1], N = bd[1];
  const int8_t* ap = a.typed_data();
  const int8_t* bp = b.typed_data();
  int32_t* cp = c->typed_data();
  const int isa = ActiveIsa();
#ifdef JAXMEM_X86
  if (isa >= kAvx512Vnni) {
    const int64_t k4 = (K + 3) / 4, panels = (N + vnni::kGemmCols - 1) / vnni::kGemmCols;
    std::vector<int8_t> packed(panels * k4 * 256);
    std::vector<int32_t> corr(panels * vnni::kGemmCols);
    ParallelFor(&pool, panels, 1, 2, [&](int64_t p0, int64_t p1) {
      vnni::PackB(bp, K, N, p0, p1, packed.data(), corr.data());
    });
    ParallelFor(&pool, M, vnni::kGemmRows, 2 * vnni::kGemmPanelRows, [&](int64_t m0, int64_t m1) {
      vnni::GemmRows(ap, packed.data(), corr.data(), cp, K, N, m0, m1);
    });
    return ffi::Error::Success();
  }
  if (isa >= kAvx2) {
    const int64_t kp = (K + 1) / 2, panels = (N + avx2::kGemmCols - 1) / avx2::kGemmCols;
    std::vector<int16_t> packed(panels * kp * avx2::kGemmCols * 2);
    ParallelFor(&pool, panels, 1, 4, [&](int64_t p0, int64_t p1) {
      avx2::PackB(bp, K, N, p0, p1, packed.data());
    });
    ParallelFor(&pool, M, avx2::kGemmRows, 2 * avx2::kPanelRows, [&](int64_t m0, int64_t m1) {
      avx2::GemmRows(ap, packed.data(), cp, K, N, m0, m1);
    });
    return ffi::Error::Success();
  }
#endif
  ParallelFor(&pool, M, 1, 16, [&](int64_t m0, int64_t m1) { PortableGemm(ap, bp, cp, K, N, m0, m1); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmemQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("nk")
                                  .Attr<bool>("has_offset")
                                  .Attr<bool>("exact"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxmemI8Gemm, I8Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

extern "C" {
// The ISA the kernels run with here: 0 portable C, 1 AVX2+FMA, 2 AVX-512, 3 AVX-512 VNNI.
int jaxmem_native_isa() { return ActiveIsa(); }
int jaxmem_detected_isa() { return DetectIsa(); }
void jaxmem_set_max_isa(int isa) { g_max_isa.store(isa); }
}
