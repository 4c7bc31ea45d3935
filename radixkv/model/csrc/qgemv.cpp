// Weight-only low-bit matrix products for the CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), where
// W stays group-quantized in memory (groups of 32 along K) and is widened in registers only.
//
// Built at first use by radixkv/model/quant_kernels.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers (no torch or Python headers). Weight layouts:
//   int4 (fmt 0): qs [N, K/32, 16] uint8, byte j of a group = element j (low nibble) and element
//                 j + 16 (high nibble), the order of GGUF's Q4_0 / Q4_1 blocks;
//                 sc [N, K/32, 2] float16 (d, m): w = d * q + m, q in 0..15
//   int8 (fmt 1): qs [N, K/32, 32] int8, sc [N, K/32] float16 d: w = d * q (GGUF's Q8_0)
// x [M, K] and y [M, N] are float32 with row strides ldx / ldy; bias [N] float32 or null.
//
// Why widen in registers instead of quantizing the activations too (as llama.cpp's int8 dot
// products do): the result is then the float32 product with the very weights a dequantized model
// uses, so the quantized model differs from the widened one only by summation order. A decode
// step (M = 1) is bound by the bytes of weight read: 4.6x fewer than float32 for int4. The
// exception: on AVX2-only CPUs, where widening (not bytes) bounds the row kernel, decode-sized
// products may quantize x to int16 per group (rkv_qgemm_x16; error far below bf16's).
//
// For each output row n and each tile of up to 8 rows of x, a group of 32 weights is widened once
// into four 8-float vectors and then multiplies every row of the tile, so the widening cost is
// shared by the tile. OpenMP splits the output rows N between threads.

#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define RKV_AVX2 1
#else
#define RKV_AVX2 0
#endif
#if RKV_AVX2 && defined(__AVX512F__)
#define RKV_AVX512 1  // the same kernels on 16-float vectors (32 registers)
#else
#define RKV_AVX512 0
#endif

namespace {

constexpr int64_t G = 32;  // weights per group

enum Fmt : int64_t { INT4 = 0, INT8 = 1, BF16 = 2 };  // BF16: dense rows, the fp32 panel only
enum Status : int64_t { OK = 0, BAD_FMT = 1, BAD_SHAPE = 2 };

inline float half_to_float(uint16_t h) {
#if RKV_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; --exp; }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Group g of row `row` widened to 32 floats (scalar reference of the vector code below).
inline void widen_scalar(int64_t fmt, const uint8_t* qs, const uint16_t* sc, int64_t row,
                         int64_t groups, int64_t g, float* out) {
  if (fmt == INT4) {
    const uint8_t* q = qs + (row * groups + g) * 16;
    const float d = half_to_float(sc[(row * groups + g) * 2]);
    const float m = half_to_float(sc[(row * groups + g) * 2 + 1]);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * (float)(q[j] & 0x0F) + m;
      out[j + 16] = d * (float)(q[j] >> 4) + m;
    }
  } else {
    const int8_t* q = (const int8_t*)qs + (row * groups + g) * 32;
    const float d = half_to_float(sc[row * groups + g]);
    for (int j = 0; j < 32; ++j) out[j] = d * (float)q[j];
  }
}

#if RKV_AVX2
// ---- one SIMD vector of floats: AVX-512 (16 lanes) where compiled in, else AVX2 (8) ----------
#if RKV_AVX512
using vf = __m512;
constexpr int W = 16;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
#else
using vf = __m256;
constexpr int W = 8;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline float vsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif
constexpr int NV = G / W;  // vectors per group; vector j holds elements j * W .. j * W + W - 1

// Widen group `idx` (row * groups + g) into w[0 .. NV).
template <int64_t F>
inline void widen(const uint8_t* qs, const uint16_t* sc, int64_t idx, vf w[NV]) {
  if constexpr (F == INT4) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(qs + idx * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask);  // elements 0 .. 15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);  // elements 16 .. 31
#if RKV_AVX512
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(sc[idx * 2]));
    const __m512 m = _mm512_set1_ps(_cvtsh_ss(sc[idx * 2 + 1]));
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
#else
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(sc[idx * 2]));
    const __m256 m = _mm256_set1_ps(_cvtsh_ss(sc[idx * 2 + 1]));
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
#endif
  } else {
    const int8_t* q = (const int8_t*)qs + idx * 32;
#if RKV_AVX512
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(sc[idx]));
    for (int j = 0; j < 2; ++j) {
      const __m128i b = _mm_loadu_si128((const __m128i*)(q + 16 * j));
      w[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
    }
#else
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(sc[idx]));
    for (int j = 0; j < 4; ++j) {
      const __m128i b = _mm_loadl_epi64((const __m128i*)(q + 8 * j));
      w[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    }
#endif
  }
}

// ---- row kernel (decode: 1 to a few rows of x) --------------------------------------------------
// Rows m0 .. m0 + MT of x times row n of W: each group is widened once in registers and used by
// the MT rows. A accumulators per x row keep enough FMA chains independent when MT is small.
template <int64_t F, int MT>
inline void tile(const float* x, int64_t ldx, const uint8_t* qs, const uint16_t* sc, int64_t n,
                 int64_t groups, float* out /* [MT] */) {
  constexpr int A = MT >= NV ? 1 : NV / MT;
  vf acc[MT][A];
  for (int i = 0; i < MT; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    vf w[NV];
    widen<F>(qs, sc, n * groups + g, w);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) {
      const float* xp = x + i * ldx + g * G;
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j % A] = vfma(w[j], vload(xp + W * j), acc[i][j % A]);
    }
  }
  for (int i = 0; i < MT; ++i) {
    vf s = acc[i][0];
    for (int a = 1; a < A; ++a) s = vadd(s, acc[i][a]);
    out[i] = vsum(s);
  }
}

template <int64_t F>
void row_all_m(int64_t M, const float* x, int64_t ldx, const uint8_t* qs, const uint16_t* sc,
               int64_t n, int64_t groups, float* y, int64_t ldy, float b) {
  float r[8];
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) {
    tile<F, 8>(x + m * ldx, ldx, qs, sc, n, groups, r);
    for (int i = 0; i < 8; ++i) y[(m + i) * ldy + n] = r[i] + b;
  }
  const int64_t rest = M - m;
  const float* xm = x + m * ldx;
  switch (rest) {  // the remainder as one tile of its exact height
    case 1: tile<F, 1>(xm, ldx, qs, sc, n, groups, r); break;
    case 2: tile<F, 2>(xm, ldx, qs, sc, n, groups, r); break;
    case 3: tile<F, 3>(xm, ldx, qs, sc, n, groups, r); break;
    case 4: tile<F, 4>(xm, ldx, qs, sc, n, groups, r); break;
    case 5: tile<F, 5>(xm, ldx, qs, sc, n, groups, r); break;
    case 6: tile<F, 6>(xm, ldx, qs, sc, n, groups, r); break;
    case 7: tile<F, 7>(xm, ldx, qs, sc, n, groups, r); break;
    default: break;
  }
  for (int64_t i = 0; i < rest; ++i) y[(m + i) * ldy + n] = r[i] + b;
}

// ---- int16-activation row kernel (decode on AVX2-only CPUs) ------------------------------------
// On AVX2 the float32 row kernel is bound by widening, not by bytes: per group of 32 int4
// weights it spends ~14 instructions turning nibbles into floats for 4 FMAs per row of x. Here
// x is quantized to int16 per group of 32: xq = round(x * 32767 / max|x|), dx = max|x| / 32767,
// plus the group's exact float sum sx, so a group's dot product is integer:
//   int4: sum_j (d q_j + m) x_j ~= d dx sum_j q_j xq_j + m sx
//   int8: sum_j d q_j x_j       ~= d dx sum_j q_j xq_j
// with sum_j q_j xq_j from two vpmaddwd (16-bit products summed in pairs into int32: at most
// 4 * 127 * 32767 < 2^31) on the weights zero- or sign-extended to 16 bits, then one convert and
// one FMA by d dx. x's rounding is 1/65534 of its group's largest |x|: below bf16's rounding of
// each element even for groups with a 30x outlier (SmolLM2's down_proj inputs reach |x| ~2800).
// 8-bit x (llama.cpp's Q8 activations; one vpmaddubsw, ~8% faster here) was measured and left
// out: on SmolLM2 it moved decode-path perplexity +2.4% against float32 (outlier groups leave
// the other 31 values a few levels each).
struct X16 {
  const int16_t* q;  // [M, K]
  const float* ds;   // [M, K/32, 2] (dx, sx) interleaved, as int4 scales store (d, m)
};

// x [M, K] (row stride ldx) quantized into per-thread buffers (grown as needed).
X16 quantize_x16(int64_t M, int64_t K, const float* x, int64_t ldx) {
  static thread_local std::vector<int16_t> codes;
  static thread_local std::vector<float> sums;  // (dx, sx) pairs: [M, K/32, 2]
  const int64_t groups = K / G;
  if ((int64_t)codes.size() < M * K) codes.resize(M * K);
  if ((int64_t)sums.size() < 2 * M * groups) sums.resize(2 * M * groups);
  float* ds = sums.data();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* p = x + m * ldx + g * G;
      __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(p + 8 * j);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], absmask));
        sum = _mm256_add_ps(sum, v[j]);
      }
      __m128 a = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      a = _mm_max_ps(a, _mm_movehl_ps(a, a));
      a = _mm_max_ss(a, _mm_movehdup_ps(a));
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      const float top = _mm_cvtss_f32(a), total = _mm_cvtss_f32(s);
      // max_ps drops NaNs; the sum keeps them (and infinities): then the scale carries them
      const bool finite = total - total == 0.0f;
      const float inv = top > 0.0f && finite ? 32767.0f / top : 0.0f;
      ds[2 * (m * groups + g)] = finite ? top / 32767.0f : total;
      ds[2 * (m * groups + g) + 1] = total;
      const __m256 k = _mm256_set1_ps(inv);
      __m256i i[4];
      for (int j = 0; j < 4; ++j) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], k));  // nearest
      int16_t* o = codes.data() + m * K + g * G;
      for (int j = 0; j < 4; j += 2)  // packs interleaves 128-bit lanes; the permute undoes it
        _mm256_storeu_si256((__m256i*)(o + 8 * j), _mm256_permute4x64_epi64(
            _mm256_packs_epi32(i[j], i[j + 1]), 0xD8));
    }
  return {codes.data(), ds};
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Rows 0 .. MT of the quantized x times row n of W (two accumulators per row, even and odd
// groups, so the FMA chains overlap; also for the scalar m * sx sums, whose one chain per row
// had bound the loop: 12.1 -> 9.0-9.7 ms for 30 layers at one row on one Zen 3 core).
template <int64_t F, int MT>
inline void tile_x16(const X16& x, int64_t K, const uint8_t* qs, const uint16_t* sc, int64_t n,
                     float* out /* [MT] */) {
  const int64_t groups = K / G;
  __m256 acc[MT][2];
  float mins[MT][2];
  for (int i = 0; i < MT; ++i) {
    acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    mins[i][0] = mins[i][1] = 0.0f;
  }
  const __m128i nib = _mm_set1_epi8(0x0F);
  auto group = [&](int64_t g, int a) __attribute__((always_inline)) {
    const int64_t idx = n * groups + g;
    __m256i w0, w1;  // elements 0 .. 15, 16 .. 31 as int16
    float d, m = 0.0f;
    if constexpr (F == INT4) {
      const __m128i raw = _mm_loadu_si128((const __m128i*)(qs + idx * 16));
      w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, nib));
      w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), nib));
      d = _cvtsh_ss(sc[idx * 2]);
      m = _cvtsh_ss(sc[idx * 2 + 1]);
    } else {
      const int8_t* q = (const int8_t*)qs + idx * 32;
      w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)q));
      w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + 16)));
      d = _cvtsh_ss(sc[idx]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < MT; ++i) {
      const int16_t* xp = x.q + i * K + g * G;
      const __m256i p = _mm256_add_epi32(  // [8] int32
          _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i*)xp)),
          _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i*)(xp + 16))));
      const float* dsx = x.ds + 2 * (i * groups + g);  // (dx, sx)
      acc[i][a] = _mm256_fmadd_ps(_mm256_set1_ps(d * dsx[0]), _mm256_cvtepi32_ps(p), acc[i][a]);
      if constexpr (F == INT4) mins[i][a] += m * dsx[1];
    }
  };
  // int4, two groups at a time: their four float16 scales (d0, m0, d1, m1) widened by one
  // vcvtph2ps and multiplied by x's (dx0, sx0, dx1, sx1) in one go; lanes 0 and 2 are the two
  // FMA scales, lanes 1 and 3 the m * sx terms, summed as a vector (~10 fewer instructions per
  // pair than scalar conversions and products).
  __m128 msum[MT];
  for (int i = 0; i < MT; ++i) msum[i] = _mm_setzero_ps();
  auto pair = [&](int64_t g) __attribute__((always_inline)) {
    const int64_t idx = n * groups + g;
    const __m128i raw0 = _mm_loadu_si128((const __m128i*)(qs + idx * 16));
    const __m128i raw1 = _mm_loadu_si128((const __m128i*)(qs + idx * 16 + 16));
    const __m256i w00 = _mm256_cvtepu8_epi16(_mm_and_si128(raw0, nib));
    const __m256i w01 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw0, 4), nib));
    const __m256i w10 = _mm256_cvtepu8_epi16(_mm_and_si128(raw1, nib));
    const __m256i w11 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw1, 4), nib));
    const __m128 dm = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(sc + idx * 2)));
#pragma GCC unroll 4
    for (int i = 0; i < MT; ++i) {
      const __m128 sv = _mm_mul_ps(dm, _mm_loadu_ps(x.ds + 2 * (i * groups + g)));
      msum[i] = _mm_add_ps(msum[i], sv);
      const int16_t* xp = x.q + i * K + g * G;
      const __m256i p0 = _mm256_add_epi32(
          _mm256_madd_epi16(w00, _mm256_loadu_si256((const __m256i*)xp)),
          _mm256_madd_epi16(w01, _mm256_loadu_si256((const __m256i*)(xp + 16))));
      const __m256i p1 = _mm256_add_epi32(
          _mm256_madd_epi16(w10, _mm256_loadu_si256((const __m256i*)(xp + 32))),
          _mm256_madd_epi16(w11, _mm256_loadu_si256((const __m256i*)(xp + 48))));
      acc[i][0] = _mm256_fmadd_ps(_mm256_broadcastss_ps(sv), _mm256_cvtepi32_ps(p0), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehl_ps(sv, sv)),
                                  _mm256_cvtepi32_ps(p1), acc[i][1]);
    }
  };
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    if constexpr (F == INT4) {
      pair(g);
    } else {
      group(g, 0);
      group(g + 1, 1);
    }
  }
  if (g < groups) group(g, 0);
  for (int i = 0; i < MT; ++i) {
    const __m128 odd = _mm_movehdup_ps(msum[i]);  // lanes 1 and 3: the m * sx sums
    const float mv = _mm_cvtss_f32(_mm_add_ss(odd, _mm_movehl_ps(odd, odd)));
    out[i] = hsum256(_mm256_add_ps(acc[i][0], acc[i][1])) + (mins[i][0] + mins[i][1]) + mv;
  }
}

template <int64_t F>
void row_all_m_x16(int64_t M, const X16& x, int64_t K, const uint8_t* qs, const uint16_t* sc,
                   int64_t n, float* y, int64_t ldy, float b) {
  const int64_t groups = K / G;
  float r[4];
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) {  // tiles of 4 rows (5+ rows: the float row kernel is as fast)
    const X16 t{x.q + m * K, x.ds + 2 * m * groups};
    tile_x16<F, 4>(t, K, qs, sc, n, r);
    for (int i = 0; i < 4; ++i) y[(m + i) * ldy + n] = r[i] + b;
  }
  const X16 t{x.q + m * K, x.ds + 2 * m * groups};
  const int64_t rest = M - m;
  switch (rest) {
    case 1: tile_x16<F, 1>(t, K, qs, sc, n, r); break;
    case 2: tile_x16<F, 2>(t, K, qs, sc, n, r); break;
    case 3: tile_x16<F, 3>(t, K, qs, sc, n, r); break;
    default: break;
  }
  for (int64_t i = 0; i < rest; ++i) y[(m + i) * ldy + n] = r[i] + b;
}

#if RKV_AVX512
// ---- blocked kernel (a few dozen rows of x; AVX-512 builds) ------------------------------------
// The row kernel widens every group once per 8 rows of x and then needs one load of x per FMA,
// so from ~8-16 rows on it runs at the load ports' rate, not the FMA units'. This one widens a
// block of NB weight rows once into a per-thread float32 buffer that stays in L1 (NB * K * 4
// bytes <= BLOCK_BYTES), then sweeps all M rows of x over it with an MR x NR register tile: per
// vector of K, MR loads of x + NR of W feed MR * NR independent FMAs (accumulators + NR weight
// vectors + one x vector fill the 32 zmm registers for 4 x 6), and the widening is shared by
// all M rows. AVX2 builds run the float32 panel kernel in its place (panel32_product; the 4 x 3
// tile that fits 16 ymm registers ran at ~42% of the FMA peak on a Zen 3).
constexpr int MR = 4;
constexpr int NR = 6;
constexpr int64_t BLOCK_BYTES = 16 << 10;  // the widened block; with a 4-row x tile it fits L1

template <int R, int C>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                  const float* b /* [C] */) {
  vf acc[R][C];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) acc[i][j] = vzero();
  for (int64_t k = 0; k < K; k += W) {
    vf wv[C];
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) wv[j] = vload(w + j * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const vf xv = vload(x + i * ldx + k);
#pragma GCC unroll 6
      for (int j = 0; j < C; ++j) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) y[i * ldy + j] = vsum(acc[i][j]) + b[j];
}

template <int R>
inline void micro_cols(int c, const float* x, int64_t ldx, const float* w, int64_t K, float* y,
                       int64_t ldy, const float* b) {
  switch (c) {
    case 6: micro<R, 6>(x, ldx, w, K, y, ldy, b); break;
    case 5: micro<R, 5>(x, ldx, w, K, y, ldy, b); break;
    case 4: micro<R, 4>(x, ldx, w, K, y, ldy, b); break;
    case 3: micro<R, 3>(x, ldx, w, K, y, ldy, b); break;
    case 2: micro<R, 2>(x, ldx, w, K, y, ldy, b); break;
    case 1: micro<R, 1>(x, ldx, w, K, y, ldy, b); break;
    default: break;
  }
}

inline void micro_any(int r, int c, const float* x, int64_t ldx, const float* w, int64_t K,
                      float* y, int64_t ldy, const float* b) {
  switch (r) {
    case 4: micro_cols<4>(c, x, ldx, w, K, y, ldy, b); break;
    case 3: micro_cols<3>(c, x, ldx, w, K, y, ldy, b); break;
    case 2: micro_cols<2>(c, x, ldx, w, K, y, ldy, b); break;
    case 1: micro_cols<1>(c, x, ldx, w, K, y, ldy, b); break;
    default: break;
  }
}
#endif  // RKV_AVX512

// Group `idx` widened and rounded to bfloat16 (nearest even) into o[0 .. 32).
template <int64_t F>
inline void widen_bf16(const uint8_t* qs, const uint16_t* sc, int64_t idx, uint16_t* o) {
  vf w[NV];
  widen<F>(qs, sc, idx, w);
#if RKV_AVX512 && defined(__AVX512BF16__)
  // one instruction rounds both halves to bf16 (nearest even, as the AVX2 code below)
  _mm512_storeu_si512((void*)o, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
#else
  alignas(64) float f[G];
  for (int j = 0; j < NV; ++j) vstore(f + W * j, w[j]);
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
  __m256i h[4];
  for (int j = 0; j < 4; ++j) {
    const __m256i b = _mm256_castps_si256(_mm256_load_ps(f + 8 * j));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), one);
    h[j] = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(half, lsb)), 16);
  }
  for (int j = 0; j < 4; j += 2) {  // packus interleaves 128-bit lanes; the permute undoes it
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(h[j], h[j + 1]), 0xD8);
    _mm256_storeu_si256((__m256i*)(o + 8 * j), p);
  }
#endif
}
#endif

#if RKV_AVX512 && defined(__AVX512BF16__)
#define RKV_BF16_BLOCKED 1
// ---- blocked kernel for bfloat16 x (AVX512-BF16) ------------------------------------------------
// The blocked kernel above multiplies in float32: at 16-31 rows it is compute-bound (a 20-row
// product of SmolLM2's 3072 x 576 gate/up took 0.82 ms on a Zen 4, ~1.5 ms a layer: most of a
// chat turn's suffix prefill). In a bfloat16 model x already is bf16, and the widened weight
// rounds to bf16 as the prefill GEMM rounds it, so the block is widened to bf16 instead and
// each vdpbf16ps does 32 multiply-adds where an FMA does 16: the same MR x NR tile, half the
// instructions. Products are exact in float32; sums in float32 (order as the float kernel).
template <int R, int C>
inline void micro_bf16(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K, float* y,
                       int64_t ldy, const float* b /* [C] */) {
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {  // 32 bf16 of K per vector
    __m512bh wv[C];
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) wv[j] = (__m512bh)_mm512_loadu_si512((const void*)(w + j * K + k));
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512((const void*)(x + i * ldx + k));
#pragma GCC unroll 6
      for (int j = 0; j < C; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]) + b[j];
}

template <int R>
inline void micro_bf16_cols(int c, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K,
                            float* y, int64_t ldy, const float* b) {
  switch (c) {
    case 6: micro_bf16<R, 6>(x, ldx, w, K, y, ldy, b); break;
    case 5: micro_bf16<R, 5>(x, ldx, w, K, y, ldy, b); break;
    case 4: micro_bf16<R, 4>(x, ldx, w, K, y, ldy, b); break;
    case 3: micro_bf16<R, 3>(x, ldx, w, K, y, ldy, b); break;
    case 2: micro_bf16<R, 2>(x, ldx, w, K, y, ldy, b); break;
    case 1: micro_bf16<R, 1>(x, ldx, w, K, y, ldy, b); break;
    default: break;
  }
}

inline void micro_any(int r, int c, const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t K,
                      float* y, int64_t ldy, const float* b) {
  switch (r) {
    case 4: micro_bf16_cols<4>(c, x, ldx, w, K, y, ldy, b); break;
    case 3: micro_bf16_cols<3>(c, x, ldx, w, K, y, ldy, b); break;
    case 2: micro_bf16_cols<2>(c, x, ldx, w, K, y, ldy, b); break;
    case 1: micro_bf16_cols<1>(c, x, ldx, w, K, y, ldy, b); break;
    default: break;
  }
}
#else
#define RKV_BF16_BLOCKED 0
#endif

void row_all_m_scalar(int64_t fmt, int64_t M, const float* x, int64_t ldx, const uint8_t* qs,
                      const uint16_t* sc, int64_t n, int64_t groups, float* y, int64_t ldy,
                      float b) {
  float w[G];
  for (int64_t m = 0; m < M; ++m) y[m * ldy + n] = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    widen_scalar(fmt, qs, sc, n, groups, g, w);
    for (int64_t m = 0; m < M; ++m) {
      const float* xp = x + m * ldx + g * G;
      float s = 0.0f;
      for (int j = 0; j < G; ++j) s += w[j] * xp[j];
      y[m * ldy + n] += s;
    }
  }
  for (int64_t m = 0; m < M; ++m) y[m * ldy + n] += b;
}

int threads_for(int64_t work, int64_t nthreads) {
  // Below ~64k multiply-adds a fork/join costs more than it saves.
  return work < (1 << 16) ? 1 : (int)(nthreads < 1 ? 1 : nthreads);
}

#if RKV_AVX2
// Rows n0 .. n0 + nb of W widened into `buf` [nb, K]: float32 (the blocked and the float32 panel
// kernels), or bf16 (the bf16 blocked kernel).
template <int64_t F>
void widen_block(const uint8_t* qs, const uint16_t* sc, int64_t n0, int64_t nb, int64_t K,
                 float* buf) {
  const int64_t groups = K / G;
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      vf w[NV];
      widen<F>(qs, sc, (n0 + r) * groups + g, w);
      for (int j = 0; j < NV; ++j) vstore(buf + r * K + g * G + W * j, w[j]);
    }
}

template <int64_t F>
void widen_block(const uint8_t* qs, const uint16_t* sc, int64_t n0, int64_t nb, int64_t K,
                 uint16_t* buf) {
  const int64_t groups = K / G;
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t g = 0; g < groups; ++g)
      widen_bf16<F>(qs, sc, (n0 + r) * groups + g, buf + r * K + g * G);
}

#if RKV_AVX512
// Rows n0 .. n0 + nb of W times all M rows of x (T: float, or bf16 bits with the bf16 blocked
// kernel), through the widened buffer `buf` [nb, K] of the same type.
template <int64_t F, typename T>
void block_all_m(int64_t M, const T* x, int64_t ldx, const uint8_t* qs, const uint16_t* sc,
                 int64_t n0, int64_t nb, int64_t K, const float* bias, float* y, int64_t ldy,
                 T* buf) {
  widen_block<F>(qs, sc, n0, nb, K, buf);
  float b[NR];
  for (int64_t m = 0; m < M; m += MR) {
    const int r = (int)(M - m < MR ? M - m : MR);
    for (int64_t j = 0; j < nb; j += NR) {
      const int c = (int)(nb - j < NR ? nb - j : NR);
      for (int t = 0; t < c; ++t) b[t] = bias ? bias[n0 + j + t] : 0.0f;
      micro_any(r, c, x + m * ldx, ldx, buf + j * K, K, y + m * ldy + n0 + j, ldy, b);
    }
  }
}

// The blocked product for x of type T: blocks of NB weight rows (their float32 widening fits
// BLOCK_BYTES; a bf16 block takes the same rows) split between the threads.
template <typename T>
int64_t blocked_product(int64_t fmt, int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx,
                        const uint8_t* qs, const uint16_t* sc, const float* bias, float* y,
                        int64_t ldy, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (M < 0 || N < 0 || K <= 0 || K % G != 0 || ldx < K || ldy < N) return BAD_SHAPE;
  int64_t nb = (BLOCK_BYTES / 4 / K) / NR * NR;
  if (nb < NR) nb = NR;  // wide K: the block spills to L2, still widened once for all M
  const int64_t blocks = (N + nb - 1) / nb;
  const int nt = threads_for(M * N * K, nthreads);
  (void)nt;
#pragma omp parallel num_threads(nt)
  {
    const std::unique_ptr<T[]> buf(new T[(size_t)(nb * K)]);  // no zero fill: widened over
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t n0 = bi * nb;
      const int64_t rows = N - n0 < nb ? N - n0 : nb;
      if (fmt == INT4)
        block_all_m<INT4>(M, x, ldx, qs, sc, n0, rows, K, bias, y, ldy, buf.get());
      else
        block_all_m<INT8>(M, x, ldx, qs, sc, n0, rows, K, bias, y, ldy, buf.get());
    }
  }
  return OK;
}
#endif  // RKV_AVX512

#if !RKV_AVX512
// ---- panel kernel for float32 x (AVX2 builds: the blocked range and up) ----------------------
// The blocked kernel's 4 x 3 dot-product tile ends every output in a horizontal sum and, on
// AVX2's 16 registers, reloads x for every 3 columns: it ran at ~42% of the FMA peak on a Zen 3.
// Here x is repacked once per call into panels of 16 rows, K-major (xp[k][16]: two vectors per
// k), and a 16 x 6 tile of outer products runs over a block of weight rows widened to float32:
// per k two loads of x, six broadcasts of W and twelve independent FMAs, no horizontal sums.
// With the widening left out it runs at the FMA peak; widening (shared by all M rows) is the
// rest: 30 layers at 32 rows 84.7 -> 46.6 ms on 2 threads (bench/quant_kernels.py).
constexpr int64_t P32_ROWS = 16;   // rows of x per panel (two 8-float vectors)
constexpr int P32_COLS = 6;        // weight rows (output columns) per tile
constexpr int64_t P32_BLOCK = 48;  // weight rows widened per block (8 tiles; 110 KB at K=576)

// Rows 0 .. rows of x into xp [K][8 RV], zero past `rows`.
template <int RV>
void pack_panel32(const float* x, int64_t ldx, int64_t rows, int64_t K, float* xp) {
  constexpr int64_t R = 8 * RV;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) xp[k * R + r] = r < rows ? x[r * ldx + k] : 0.0f;
}

// C output columns (weight rows w [C][K]) for the 8 RV rows of a panel: tile [C][8 RV]. RV = 1
// serves a last panel of at most 8 rows (~60% of a 16-row panel's time, not 100%).
template <int RV, int C>
inline void micro_panel32(const float* xp, const float* w, int64_t K, float* tile) {
  constexpr int64_t R = 8 * RV;
  __m256 acc[RV][C];
  for (int r = 0; r < RV; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xv[RV];
    for (int r = 0; r < RV; ++r) xv[r] = _mm256_loadu_ps(xp + k * R + 8 * r);
#pragma GCC unroll 6
    for (int j = 0; j < C; ++j) {
      const __m256 wb = _mm256_broadcast_ss(w + j * K + k);
      for (int r = 0; r < RV; ++r) acc[r][j] = _mm256_fmadd_ps(xv[r], wb, acc[r][j]);
    }
  }
  for (int j = 0; j < C; ++j)
    for (int r = 0; r < RV; ++r) _mm256_storeu_ps(tile + j * R + 8 * r, acc[r][j]);
}

template <int RV>
inline void micro_panel32_cols(int c, const float* xp, const float* w, int64_t K, float* tile) {
  switch (c) {
    case 6: micro_panel32<RV, 6>(xp, w, K, tile); break;
    case 5: micro_panel32<RV, 5>(xp, w, K, tile); break;
    case 4: micro_panel32<RV, 4>(xp, w, K, tile); break;
    case 3: micro_panel32<RV, 3>(xp, w, K, tile); break;
    case 2: micro_panel32<RV, 2>(xp, w, K, tile); break;
    case 1: micro_panel32<RV, 1>(xp, w, K, tile); break;
    default: break;
  }
}

// Rows n0 .. n0 + nb of a dense bfloat16 W [N, K] (K a multiple of 8) widened into buf [nb, K].
void widen_block_bf16w(const uint16_t* w, int64_t n0, int64_t nb, int64_t K, float* buf) {
  for (int64_t r = 0; r < nb; ++r)
    for (int64_t k = 0; k < K; k += 8) {
      const __m128i h = _mm_loadu_si128((const __m128i*)(w + (n0 + r) * K + k));
      _mm256_storeu_ps(buf + r * K + k, _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
}

int64_t panel32_product(int64_t fmt, int64_t M, int64_t N, int64_t K, const float* x,
                        int64_t ldx, const uint8_t* qs, const uint16_t* sc, const float* bias,
                        float* y, int64_t ldy, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8 && fmt != BF16) return BAD_FMT;
  if (M < 0 || N < 0 || K <= 0 || K % (fmt == BF16 ? 8 : G) != 0 || ldx < K || ldy < N)
    return BAD_SHAPE;
  if (M == 0) return OK;
  const int64_t panels = (M + P32_ROWS - 1) / P32_ROWS;
  static thread_local std::vector<float> xbuf;  // grown, never shrunk: no page faults per call
  if ((int64_t)xbuf.size() < panels * P32_ROWS * K) xbuf.resize(panels * P32_ROWS * K);
  float* xp = xbuf.data();
  const int64_t blocks = (N + P32_BLOCK - 1) / P32_BLOCK;
  const int nt = threads_for(M * N * K, nthreads);
  (void)nt;
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t rows = M - p * P32_ROWS < P32_ROWS ? M - p * P32_ROWS : P32_ROWS;
      if (rows > 8)
        pack_panel32<2>(x + p * P32_ROWS * ldx, ldx, rows, K, xp + p * P32_ROWS * K);
      else
        pack_panel32<1>(x + p * P32_ROWS * ldx, ldx, rows, K, xp + p * P32_ROWS * K);
    }  // (the loop's barrier: every panel is packed before any block uses it)
    static thread_local std::vector<float> wbuf;
    if ((int64_t)wbuf.size() < P32_BLOCK * K) wbuf.resize(P32_BLOCK * K);
    alignas(32) float tile[P32_COLS * P32_ROWS];
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t n0 = bi * P32_BLOCK, nb = N - n0 < P32_BLOCK ? N - n0 : P32_BLOCK;
      if (fmt == INT4)
        widen_block<INT4>(qs, sc, n0, nb, K, wbuf.data());
      else if (fmt == INT8)
        widen_block<INT8>(qs, sc, n0, nb, K, wbuf.data());
      else
        widen_block_bf16w((const uint16_t*)qs, n0, nb, K, wbuf.data());
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t rows = M - p * P32_ROWS < P32_ROWS ? M - p * P32_ROWS : P32_ROWS;
        for (int64_t j = 0; j < nb; j += P32_COLS) {
          const int c = (int)(nb - j < P32_COLS ? nb - j : P32_COLS);
          const int64_t R = rows > 8 ? 16 : 8;  // the panel's height as packed
          if (R == 16)
            micro_panel32_cols<2>(c, xp + p * P32_ROWS * K, wbuf.data() + j * K, K, tile);
          else
            micro_panel32_cols<1>(c, xp + p * P32_ROWS * K, wbuf.data() + j * K, K, tile);
          float* yp = y + p * P32_ROWS * ldy + n0 + j;
          for (int64_t r = 0; r < rows; ++r)
            for (int t = 0; t < c; ++t)
              yp[r * ldy + t] = tile[t * R + r] + (bias ? bias[n0 + j + t] : 0.0f);
        }
      }
    }
  }
  return OK;
}
#endif  // !RKV_AVX512

#if RKV_BF16_BLOCKED
// ---- panel kernel for bfloat16 x (prefill-sized M, AVX512-BF16) ------------------------------
// The blocked kernel's tiles are dot products along K: every output ends in a horizontal sum of
// a vector, which at K = 576 costs about a third of the tile's work, so from ~128 rows a bf16
// GEMM on a widened weight beat it (widening the whole weight first, then a second pass). This
// kernel is an outer product instead: x is repacked once per call into K-pairs of 16 rows
// (xp[p][r] = x[r, 2p .. 2p + 1], the operand vdpbf16ps multiplies pairwise) and each weight
// row's pair is broadcast, so a vdpbf16ps adds 16 rows' partial sums of one output column and
// no reduction is left at the end. Per pair of K a PV x PC tile does PV vector loads, PC
// broadcasts and PV * PC vdpbf16ps (24 accumulators + 4 x vectors + 1 broadcast: 29 zmm).
// The weight is widened to bf16 block by block (PB rows, in L2) once for all M rows, as in the
// blocked kernel, and the same products are summed (exact in float32; another order).
constexpr int PV = 4;                // vectors of 16 x rows per tile (64 rows)
constexpr int PC = 6;                // weight rows (output columns) per tile
constexpr int64_t PB = 8 * PC;       // weight rows widened per block

// 16 x 16 uint32 transpose in registers: v[i] lane j <- v[j] lane i.
inline void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + j], 128-bit lane L: element 4L + j of rows 4i .. 4i+3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 4 x 4 transpose of the 128-bit lanes of b[j], b[4+j], ...
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x44);
    const __m512i c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xEE);
    v[j] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    v[4 + j] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    v[8 + j] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    v[12 + j] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// Rows 0 .. rows (<= 16) of x [*, K] bf16 as K-pairs: xp[p * 16 + r] = pair p of row r, zero for
// r >= rows. K % 32 == 0, so the K / 2 pairs come in whole 16 x 16 blocks.
void pack_pairs16(const uint16_t* x, int64_t ldx, int64_t rows, int64_t K, uint32_t* xp) {
  __m512i v[16];
  for (int64_t p0 = 0; p0 < K / 2; p0 += 16) {
    for (int r = 0; r < 16; ++r)
      v[r] = r < rows ? _mm512_loadu_si512((const void*)(x + r * ldx + 2 * p0))
                      : _mm512_setzero_si512();
    transpose16(v);
    for (int p = 0; p < 16; ++p) _mm512_storeu_si512((void*)(xp + (p0 + p) * 16), v[p]);
  }
}

// y[r, c] = sum_p xp-block pairs . w[c] pairs (+ b[c]) for r < rows (16 * V rows at most), c < C;
// xp: V blocks of [P][16] (block stride P * 16), w: C bf16 rows of stride K.
template <int V, int C>
inline void micro_panel(const uint32_t* xp, int64_t P, const uint16_t* w, int64_t K, float* y,
                        int64_t ldy, int64_t rows, const float* b) {
  __m512 acc[V][C];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v)
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) acc[v][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh xv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      xv[v] = (__m512bh)_mm512_loadu_si512((const void*)(xp + (v * P + p) * 16));
#pragma GCC unroll 6
    for (int c = 0; c < C; ++c) {
      int32_t pair;
      std::memcpy(&pair, w + c * K + 2 * p, 4);
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[v][c] = _mm512_dpbf16_ps(acc[v][c], xv[v], wb);
    }
  }
  alignas(64) float t[16];
  for (int v = 0; v < V; ++v) {
    const int64_t n = rows - 16 * v < 16 ? rows - 16 * v : 16;
    for (int c = 0; c < C; ++c) {
      _mm512_store_ps(t, acc[v][c]);
      for (int64_t r = 0; r < n; ++r) y[(16 * v + r) * ldy + c] = t[r] + b[c];
    }
  }
}

template <int V>
inline void micro_panel_cols(int c, const uint32_t* xp, int64_t P, const uint16_t* w, int64_t K,
                             float* y, int64_t ldy, int64_t rows, const float* b) {
  switch (c) {
    case 6: micro_panel<V, 6>(xp, P, w, K, y, ldy, rows, b); break;
    case 5: micro_panel<V, 5>(xp, P, w, K, y, ldy, rows, b); break;
    case 4: micro_panel<V, 4>(xp, P, w, K, y, ldy, rows, b); break;
    case 3: micro_panel<V, 3>(xp, P, w, K, y, ldy, rows, b); break;
    case 2: micro_panel<V, 2>(xp, P, w, K, y, ldy, rows, b); break;
    case 1: micro_panel<V, 1>(xp, P, w, K, y, ldy, rows, b); break;
    default: break;
  }
}

inline void micro_panel_any(int v, int c, const uint32_t* xp, int64_t P, const uint16_t* w,
                            int64_t K, float* y, int64_t ldy, int64_t rows, const float* b) {
  switch (v) {
    case 4: micro_panel_cols<4>(c, xp, P, w, K, y, ldy, rows, b); break;
    case 3: micro_panel_cols<3>(c, xp, P, w, K, y, ldy, rows, b); break;
    case 2: micro_panel_cols<2>(c, xp, P, w, K, y, ldy, rows, b); break;
    case 1: micro_panel_cols<1>(c, xp, P, w, K, y, ldy, rows, b); break;
    default: break;
  }
}

// Weight rows n0 .. n0 + nb widened to bf16 into `buf`, times all M rows of the packed x. Each
// 64-row tile of the block's outputs is summed into `tile` [16 * PV, PB] (L1) and then copied
// into y row by row: the tiles' column-wise stores would otherwise go to 64 rows of y at its own
// stride, which for a 3072-wide output (12 KiB, a multiple of 4 KiB) all fall into the same
// cache sets (measured: the gate/up product ran at 2/3 of the others' rate).
// dst[0 .. n) = src + bias (bias may be null) at element offset `at` of y, which holds float32,
// or bfloat16 bits when `bf16` (rounded to nearest even, as torch's .to(torch.bfloat16)).
inline void store_row(const float* src, int64_t n, const float* bias, void* y, int64_t at,
                      bool bf16) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(k, src + j);
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + j));
    if (bf16)
      _mm256_mask_storeu_epi16((uint16_t*)y + at + j, k, (__m256i)_mm512_cvtneps_pbh(v));
    else
      _mm512_mask_storeu_ps((float*)y + at + j, k, v);
  }
}

template <int64_t F>
void panel_block(int64_t M, const uint32_t* xp, const uint8_t* qs, const uint16_t* sc,
                 int64_t n0, int64_t nb, int64_t K, const float* bias, void* y, int64_t ldy,
                 bool ybf16, uint16_t* buf, float* tile) {
  widen_block<F>(qs, sc, n0, nb, K, buf);
  const int64_t P = K / 2;
  static constexpr float zero[PC] = {};
  for (int64_t m = 0; m < M; m += 16 * PV) {
    const int64_t rows = M - m < 16 * PV ? M - m : 16 * PV;
    const int v = (int)((rows + 15) / 16);
    for (int64_t j = 0; j < nb; j += PC) {
      const int c = (int)(nb - j < PC ? nb - j : PC);
      micro_panel_any(v, c, xp + (m / 16) * P * 16, P, buf + j * K, K, tile + j, PB, rows, zero);
    }
    for (int64_t r = 0; r < rows; ++r) store_row(tile + r * PB, nb, bias ? bias + n0 : nullptr,
                                                 y, (m + r) * ldy + n0, ybf16);
  }
}

// Scratch that lives with its thread (the caller's, OpenMP's pooled workers) and only grows:
// prefill calls this ~120 times per forward, and fresh 0.6-1.5 MB buffers cost their page
// faults and zeroing on every call (~2% of a 512-token prefill's samples in perf).
thread_local std::vector<uint32_t> xp_scratch;
thread_local std::vector<uint16_t> block_scratch;

template <typename T>
T* grown(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

int64_t panel_product(int64_t fmt, int64_t M, int64_t N, int64_t K, const uint16_t* x,
                      int64_t ldx, const uint8_t* qs, const uint16_t* sc, const float* bias,
                      void* y, int64_t ldy, bool ybf16, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (M < 0 || N < 0 || K <= 0 || K % G != 0 || ldx < K || ldy < N) return BAD_SHAPE;
  if (M == 0 || N == 0) return OK;
  const int64_t P = K / 2, mblocks = (M + 15) / 16, blocks = (N + PB - 1) / PB;
  uint32_t* xp = grown(xp_scratch, (size_t)(mblocks * P * 16));
  const int nt = threads_for(M * N * K, nthreads);
  (void)nt;
#pragma omp parallel num_threads(nt)
  {
#pragma omp for schedule(static)
    for (int64_t i = 0; i < mblocks; ++i)
      pack_pairs16(x + i * 16 * ldx, ldx, M - i * 16 < 16 ? M - i * 16 : 16, K,
                   xp + i * P * 16);
    // (the implicit barrier: every block of x is packed before any tile reads it)
    uint16_t* buf = grown(block_scratch, (size_t)(PB * K));
    alignas(64) float tile[16 * PV * PB];
#pragma omp for schedule(static)
    for (int64_t bi = 0; bi < blocks; ++bi) {
      const int64_t n0 = bi * PB;
      const int64_t rows = N - n0 < PB ? N - n0 : PB;
      if (fmt == INT4)
        panel_block<INT4>(M, xp, qs, sc, n0, rows, K, bias, y, ldy, ybf16, buf,
                          tile);
      else
        panel_block<INT8>(M, xp, qs, sc, n0, rows, K, bias, y, ldy, ybf16, buf,
                          tile);
    }
  }
  return OK;
}
#endif  // RKV_BF16_BLOCKED
#endif

}  // namespace

extern "C" {

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for m < M, n < N; returns a Status.
int64_t rkv_qgemm(int64_t fmt, int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                  const uint8_t* qs, const uint16_t* sc, const float* bias, float* y,
                  int64_t ldy, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (M < 0 || N < 0 || K <= 0 || K % G != 0 || ldx < K || ldy < N) return BAD_SHAPE;
  const int64_t groups = K / G;
  const int nt = threads_for(M * N * K, nthreads);
  (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float b = bias ? bias[n] : 0.0f;
#if RKV_AVX2
    if (fmt == INT4)
      row_all_m<INT4>(M, x, ldx, qs, sc, n, groups, y, ldy, b);
    else
      row_all_m<INT8>(M, x, ldx, qs, sc, n, groups, y, ldy, b);
#else
    row_all_m_scalar(fmt, M, x, ldx, qs, sc, n, groups, y, ldy, b);
#endif
  }
  return OK;
}

// The same product with x quantized to int16 per group of 32 (see tile_x16): the faster row
// kernel for 1-4 rows of x on AVX2-only CPUs (bench/quant_kernels.py). NO_KERNEL (3) when built
// without AVX2. Same arguments as rkv_qgemm (the compiled decode step calls either). x is
// quantized by the calling thread before the parallel loop. Returns a Status.
int64_t rkv_qgemm_x16(int64_t fmt, int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                     const uint8_t* qs, const uint16_t* sc, const float* bias, float* y,
                     int64_t ldy, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (M < 0 || N < 0 || K <= 0 || K % G != 0 || ldx < K || ldy < N) return BAD_SHAPE;
#if RKV_AVX2
  if (M == 0) return OK;
  const X16 xq = quantize_x16(M, K, x, ldx);
  const int nt = threads_for(M * N * K, nthreads);
  (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float b = bias ? bias[n] : 0.0f;
    if (fmt == INT4)
      row_all_m_x16<INT4>(M, xq, K, qs, sc, n, y, ldy, b);
    else
      row_all_m_x16<INT8>(M, xq, K, qs, sc, n, y, ldy, b);
  }
  return OK;
#else
  (void)x; (void)qs; (void)sc; (void)bias; (void)y; (void)nthreads;
  return 3;
#endif
}

// y[M, N] = x[M, K] @ W^T (+ bias) for a dense bfloat16 W [N, K] (uint16 bits, rows contiguous,
// K a multiple of 8), float32 x / y: the float32 panel kernel with W widened block by block
// (exact) instead of a whole float32 copy per product; for bf16 models on CPUs without native
// bf16 GEMMs. NO_KERNEL (3) on builds without it (AVX-512 or no AVX2). Returns a Status.
int64_t rkv_gemm_bf16w(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx,
                       const uint16_t* w, const float* bias, float* y, int64_t ldy,
                       int64_t nthreads) {
#if RKV_AVX2 && !RKV_AVX512
  return panel32_product(BF16, M, N, K, x, ldx, (const uint8_t*)w, nullptr, bias, y, ldy,
                         nthreads);
#else
  (void)M; (void)N; (void)K; (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy;
  (void)nthreads;
  return 3;
#endif
}

// 1 where rkv_qgemm_x16 is the measured default for decode rows: built with AVX2 but without
// AVX-512 (there the float32 row kernel's 16-float vectors keep up: 1.0-1.3x at one row on a
// Zen 4, slower from two), else 0.
int64_t rkv_qgemm_x16_preferred() { return RKV_AVX2 && !RKV_AVX512; }

// The same product by the blocked kernel (the faster one from ~8 rows of x on; see
// bench/quant_kernels.py); on AVX2 builds without AVX-512 by the float32 panel kernel in its
// place. Without AVX2 it is the scalar row code. Returns a Status.
int64_t rkv_qgemm_blocked(int64_t fmt, int64_t M, int64_t N, int64_t K, const float* x,
                          int64_t ldx, const uint8_t* qs, const uint16_t* sc, const float* bias,
                          float* y, int64_t ldy, int64_t nthreads) {
#if RKV_AVX2 && !RKV_AVX512
  return panel32_product(fmt, M, N, K, x, ldx, qs, sc, bias, y, ldy, nthreads);
#elif RKV_AVX2
  return blocked_product<float>(fmt, M, N, K, x, ldx, qs, sc, bias, y, ldy, nthreads);
#else
  return rkv_qgemm(fmt, M, N, K, x, ldx, qs, sc, bias, y, ldy, nthreads);
#endif
}

// The blocked product for bfloat16 x [M, K] (uint16 bits, row stride ldx): W widened to bf16 in
// L1-sized blocks, vdpbf16ps tiles (see micro_bf16); y float32. NO_KERNEL (3) when built without
// AVX512-BF16 (callers use rkv_qgemm_blocked on x widened to float32). Returns a Status.
int64_t rkv_qgemm_blocked_bf16(int64_t fmt, int64_t M, int64_t N, int64_t K, const uint16_t* x,
                               int64_t ldx, const uint8_t* qs, const uint16_t* sc,
                               const float* bias, float* y, int64_t ldy, int64_t nthreads) {
#if RKV_BF16_BLOCKED
  return blocked_product<uint16_t>(fmt, M, N, K, x, ldx, qs, sc, bias, y, ldy, nthreads);
#else
  (void)fmt; (void)M; (void)N; (void)K; (void)x; (void)ldx; (void)qs; (void)sc; (void)bias;
  (void)y; (void)ldy; (void)nthreads;
  return 3;
#endif
}

// The product for bfloat16 x by the panel kernel (x repacked into K-pairs, outer-product
// vdpbf16ps tiles, W widened to bf16 in blocks; for prefill-sized M); y float32 (ydtype 0) or
// bfloat16 bits (ydtype 1). NO_KERNEL (3) when built without AVX512-BF16. Returns a Status.
int64_t rkv_qgemm_panel_bf16(int64_t fmt, int64_t M, int64_t N, int64_t K, const uint16_t* x,
                             int64_t ldx, const uint8_t* qs, const uint16_t* sc,
                             const float* bias, void* y, int64_t ldy, int64_t ydtype,
                             int64_t nthreads) {
#if RKV_BF16_BLOCKED
  if (ydtype != 0 && ydtype != 1) return BAD_FMT;
  return panel_product(fmt, M, N, K, x, ldx, qs, sc, bias, y, ldy, ydtype == 1, nthreads);
#else
  (void)fmt; (void)M; (void)N; (void)K; (void)x; (void)ldx; (void)qs; (void)sc; (void)bias;
  (void)y; (void)ldy; (void)ydtype; (void)nthreads;
  return 3;
#endif
}

// 1 when rkv_qgemm_blocked_bf16 is compiled in (AVX512-BF16), else 0.
int64_t rkv_qgemm_bf16_blocked() { return RKV_BF16_BLOCKED; }

// out[n, :] = W[n, :] widened to float32 (row stride ldo), for n < N; returns a Status.
int64_t rkv_dequant(int64_t fmt, int64_t N, int64_t K, const uint8_t* qs, const uint16_t* sc,
                    float* out, int64_t ldo, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (N < 0 || K <= 0 || K % G != 0 || ldo < K) return BAD_SHAPE;
  const int64_t groups = K / G;
  const int nt = threads_for(N * K, nthreads);
  (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      float* o = out + n * ldo + g * G;
#if RKV_AVX2
      vf w[NV];
      if (fmt == INT4)
        widen<INT4>(qs, sc, n * groups + g, w);
      else
        widen<INT8>(qs, sc, n * groups + g, w);
      for (int j = 0; j < NV; ++j) vstore(o + W * j, w[j]);
#else
      widen_scalar(fmt, qs, sc, n, groups, g, o);
#endif
    }
  }
  return OK;
}

// out[n, :] = W[n, :] widened and rounded to bfloat16 (round to nearest even; uint16 bits, row
// stride ldo), for n < N: the weight operand of a native bf16 GEMM. Returns a Status.
int64_t rkv_dequant_bf16(int64_t fmt, int64_t N, int64_t K, const uint8_t* qs,
                         const uint16_t* sc, uint16_t* out, int64_t ldo, int64_t nthreads) {
  if (fmt != INT4 && fmt != INT8) return BAD_FMT;
  if (N < 0 || K <= 0 || K % G != 0 || ldo < K) return BAD_SHAPE;
  const int64_t groups = K / G;
  const int nt = threads_for(N * K, nthreads);
  (void)nt;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* o = out + n * ldo + g * G;
#if RKV_AVX2
      if (fmt == INT4)
        widen_bf16<INT4>(qs, sc, n * groups + g, o);
      else
        widen_bf16<INT8>(qs, sc, n * groups + g, o);
#else
      float f[G];
      widen_scalar(fmt, qs, sc, n, groups, g, f);
      for (int j = 0; j < G; ++j) {
        uint32_t b;
        std::memcpy(&b, &f[j], 4);
        o[j] = (uint16_t)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
      }
#endif
    }
  }
  return OK;
}

// 1 when the AVX2 + FMA + F16C code was compiled in, 0 for the portable scalar code.
int64_t rkv_qgemm_simd() { return RKV_AVX2; }

// The SIMD width in floats the kernels were compiled for: 16 (AVX-512), 8 (AVX2), 1 (scalar).
int64_t rkv_qgemm_width() {
#if RKV_AVX2
  return W;
#else
  return 1;
#endif
}

}  // extern "C"
