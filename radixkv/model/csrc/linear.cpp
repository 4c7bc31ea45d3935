// Skinny matrix products for the CPU: y[M, N] = x[M, K] @ w[N, K]^T (+ bias), for the few-row
// products of decode (M = batch size), where the work is reading the weights once.
//
// Built at first use by radixkv/model/linear_kernels.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers, like radixkv/attention/csrc/paged_attention.cpp.
// Layouts: x, y row-major with row strides x_s / y_s (elements); w [N, K] with row stride w_s,
// last dim contiguous; bias [N] or null. Storage dtypes: x / y float32 or bfloat16 (the same),
// w float32, bfloat16 or float16. All accumulation is float32; half weights are widened in
// registers, so a bfloat16 weight costs half the memory traffic of a float32 one and needs no
// native bf16 instructions (AVX2 is enough).
//
// Tiling: threads split N into contiguous ranges (each weight row is read by one thread, once
// per call); a thread walks its rows four at a time and, for each group of four rows, all of x
// two rows at a time, so the four weight rows are streamed from memory once and re-read from L1
// for the other rows of x. The sum over K runs in 8-wide partial sums added pairwise at the end:
// a different (not worse) rounding order than a BLAS, hence equal within float32 rounding.

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int W = 8;  // floats per vector
typedef float vf __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef _Float16 vh __attribute__((vector_size(16)));

struct bf16 { uint16_t bits; };

enum DType : int64_t { F32 = 0, BF16 = 1, F16 = 2 };

inline vf zero() { return vf{0, 0, 0, 0, 0, 0, 0, 0}; }

inline float hsum(vf v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline vf load(const bf16* p) {
#ifdef __AVX2__
  // One widening load + shift (the generic form below compiles to two half-width widenings).
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return (vf)_mm256_slli_epi32(u, 16);
#else
  vu16 h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
#endif
}
inline vf load(const _Float16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
}
inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) {
  uint32_t u = (uint32_t)x.bits << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline float to_f32(_Float16 x) { return (float)x; }
inline void store1(float* p, float v) { *p = v; }
inline void store1(bf16* p, float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { p->bits = (uint16_t)((u >> 16) | 0x40u); return; }
  p->bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}

struct Args {
  int64_t M, N, K;
  int64_t x_dtype, w_dtype;
  int64_t x, x_s;   // data pointers are passed as integers
  int64_t w, w_s;
  int64_t bias;     // [N] in x's dtype, 0: none
  int64_t y, y_s;
  int64_t threads;
};

// acc[r][j] = x row r . w row j over K, for R (1 or 2) rows of x and J (1..4) weight rows.
// `next` (the next block's first weight row, or null) is prefetched a cache line per row as
// this block is read: a weight row is too short a stream for the hardware prefetcher, and
// without it a bf16 product of 1 row ran at ~5 GB/s on one core of a Zen 3, its loads stalling.
template <int R, int J, typename WT>
inline void tile(const float* x, int64_t xs, const WT* w, int64_t ws, int64_t K, float* out,
                 const WT* next) {
  vf acc[R][J];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) acc[r][j] = zero();
  const int64_t K8 = K & ~(int64_t)(W - 1);
  for (int64_t k = 0; k < K8; k += W) {
    if (next && ((k * (int64_t)sizeof(WT)) & 63) == 0)
      for (int j = 0; j < J; ++j) __builtin_prefetch(next + j * ws + k);
    vf wv[J];
    for (int j = 0; j < J; ++j) wv[j] = load(w + j * ws + k);
    for (int r = 0; r < R; ++r) {
      vf xv = load(x + r * xs + k);
      for (int j = 0; j < J; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t k = K8; k < K; ++k) s += x[r * xs + k] * to_f32(w[j * ws + k]);
      out[r * 4 + j] = s;
    }
}

// The first pass over the block's weight rows (x rows 0-1) streams them from memory and
// prefetches `next`; the other passes find them in L1.
template <int J, typename WT>
inline void rows_block(const float* x, int64_t M, int64_t K, const WT* w, int64_t ws,
                       float* out /* [M, 4] */, const WT* next) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    tile<2, J>(x + m * K, K, w, ws, K, out + m * 4, m == 0 ? next : nullptr);
  if (m < M) tile<1, J>(x + m * K, K, w, ws, K, out + m * 4, m == 0 ? next : nullptr);
}

template <typename XT, typename WT>
int64_t run(const Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
  const XT* x = reinterpret_cast<const XT*>(a.x);
  const WT* w = reinterpret_cast<const WT*>(a.w);
  const XT* bias = reinterpret_cast<const XT*>(a.bias);
  XT* y = reinterpret_cast<XT*>(a.y);
  // x in float32, packed [M, K]: tiny (M rows), read many times.
  std::vector<float> xf((size_t)(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = to_f32(x[m * a.x_s + k]);
  const int64_t blocks = (N + 3) / 4;
  int nt = (int)(a.threads < 1 ? 1 : a.threads);
  // Below ~64K weights a second thread costs more to wake than it saves.
  if (N * K < 65536 || blocks < 2 * nt) nt = 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    int t = 0, T = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    const int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
    std::vector<float> out((size_t)(M * 4));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * 4;
      const int64_t J = N - n0 < 4 ? N - n0 : 4;
      const WT* wb = w + n0 * a.w_s;
      const WT* nx = b + 1 < b1 && n0 + 8 <= N ? wb + 4 * a.w_s : nullptr;  // a full block
      switch (J) {
        case 4: rows_block<4>(xf.data(), M, K, wb, a.w_s, out.data(), nx); break;
        case 3: rows_block<3>(xf.data(), M, K, wb, a.w_s, out.data(), nx); break;
        case 2: rows_block<2>(xf.data(), M, K, wb, a.w_s, out.data(), nx); break;
        default: rows_block<1>(xf.data(), M, K, wb, a.w_s, out.data(), nx); break;
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < J; ++j) {
          float v = out[m * 4 + j];
          if (bias) v += to_f32(bias[n0 + j]);
          store1(y + m * a.y_s + n0 + j, v);
        }
    }
  }
  return 0;
}

template <typename XT>
int64_t dispatch_w(const Args& a) {
  switch (a.w_dtype) {
    case F32: return run<XT, float>(a);
    case BF16: return run<XT, bf16>(a);
    case F16: return run<XT, _Float16>(a);
    default: return 1;
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unsupported dtype pair.
int64_t rkv_linear(const Args* a) {
  switch (a->x_dtype) {
    case F32: return dispatch_w<float>(*a);
    case BF16: return dispatch_w<bf16>(*a);
    default: return 1;
  }
}

int64_t rkv_linear_vector_width() { return W; }

}  // extern "C"
