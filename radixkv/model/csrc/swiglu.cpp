// SwiGLU activation rows for the CPU: act[n, j] = silu(g[n, j]) * u[n, j], where g and u are the
// two halves of a row of the fused gate_up projection ([N, 2I] -> [N, I], contiguous).
//
// Built at first use by radixkv/model/swiglu_kernels.py and called through ctypes. torch needs
// three passes for this (silu_ in place on the strided gate half, mul_, then the copy that
// makes the result contiguous for the down projection); here it is one, vectorised.
//
// Rounding follows torch's ops: silu is rounded to the dtype, then the product (bfloat16:
// two roundings). e^x is computed to ~1 ulp (float32), so results agree with torch's within
// a unit in the last place, not bit for bit.

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;
#else
constexpr int V = 8;
#endif
typedef float vf __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));
typedef uint32_t vu __attribute__((vector_size(4 * V)));
typedef uint16_t vh __attribute__((vector_size(2 * V)));

enum DType : int64_t { F32 = 0, BF16 = 1 };

struct Args {
  int64_t N, I, dtype;
  int64_t gu, gu_s;    // [N, 2I], row stride gu_s
  int64_t out, out_s;  // [N, I], row stride out_s
  int64_t threads;
};

inline vf splat(float x) { return vf{} + x; }

// e^x: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact product), e^r by its
// degree-7 Taylor polynomial (error < 2e-8 relative), 2^n through the exponent bits.
inline vf vexp(vf x) {
  x = x < -87.3f ? splat(-87.3f) : x;
  x = x > 88.3f ? splat(88.3f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504f + magic) - magic;
  const vf r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  vf p = splat(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return p * (vf)e;
}

inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline vf load(const uint16_t* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline vf round_to(vf x, const float*) { return x; }
inline vf round_to(vf x, const uint16_t*) {  // to bfloat16, nearest even (inputs are finite)
  const vu u = (vu)x;
  return (vf)(((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16);
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline void store(uint16_t* p, vf x) {
  const vh h = __builtin_convertvector(((vu)round_to(x, p)) >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}

inline float bf(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }

template <typename T>
void row(const T* g, const T* u, T* out, int64_t I) {
  int64_t j = 0;
  for (; j + V <= I; j += V) {
    const vf gv = load(g + j);
    const vf s = round_to(gv / (1.f + vexp(-gv)), g);
    store(out + j, s * load(u + j));
  }
  for (; j < I; ++j) {  // the tail, through one padded vector
    T gt[V] = {}, ut[V] = {}, ot[V];
    const int64_t n = I - j;
    std::memcpy(gt, g + j, sizeof(T) * n);
    std::memcpy(ut, u + j, sizeof(T) * n);
    const vf gv = load(gt);
    store(ot, round_to(gv / (1.f + vexp(-gv)), g) * load(ut));
    std::memcpy(out + j, ot, sizeof(T) * n);
    break;
  }
}

template <typename T>
void run(const Args& a) {
  const T* gu = reinterpret_cast<const T*>(a.gu);
  T* out = reinterpret_cast<T*>(a.out);
  int nt = (int)(a.threads < 1 ? 1 : a.threads);
  if (a.N * a.I < (1 << 15)) nt = 1;  // decode-sized: a second thread costs more
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t n = 0; n < a.N; ++n)
    row<T>(gu + n * a.gu_s, gu + n * a.gu_s + a.I, out + n * a.out_s, a.I);
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unsupported dtype.
int64_t rkv_swiglu(const Args* a) {
  switch (a->dtype) {
    case F32: run<float>(*a); return 0;
    case BF16: run<uint16_t>(*a); return 0;
    default: return 1;
  }
}

}  // extern "C"
