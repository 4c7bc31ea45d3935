// SwiGLU's activation for the CPU: out[n, i] = silu(gate[n, i]) * up[n, i], with gate and up
// the two halves of the fused gate_up projection's row ([N, 2I] -> [N, I], out contiguous).
//
// Built at first use by radixkv/model/activation_kernels.py and called through ctypes. torch
// needs silu, a product and (for the next matmul) a contiguous copy of the strided result:
// three passes, each an OpenMP region at prefill sizes. Rounding: silu is computed in float32
// and rounded to the dtype, then the product is rounded again (torch's order); expf may differ
// from torch's vectorised exp in the last bit, so results agree within one rounding.

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum DType : int64_t { F32 = 0, BF16 = 1 };

struct Args {
  int64_t N, I;
  int64_t dtype;
  int64_t x, x_s;   // [N, 2I]: gate = x[:, :I], up = x[:, I:], row stride x_s
  int64_t y;        // [N, I] contiguous
  int64_t threads;
};

inline float bf(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t to_bf(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf(p[i]); }
inline float rnd(float v, const float*) { return v; }
inline float rnd(float v, const uint16_t*) { return bf(to_bf(v)); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = to_bf(v); }

template <typename T>
void run(const Args& a) {
  const T* x = reinterpret_cast<const T*>(a.x);
  T* y = reinterpret_cast<T*>(a.y);
  const int64_t I = a.I;
  int nt = (int)(a.threads < 1 ? 1 : a.threads);
  if (a.N * I < (1 << 16)) nt = 1;  // decode-sized: a second thread costs more than it saves
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    const T* g = x + n * a.x_s;
    const T* u = g + I;
    T* o = y + n * I;
    for (int64_t i = 0; i < I; ++i) {
      const float v = ld(g, i);
      const float s = rnd(v / (1.0f + std::exp(-v)), g);
      st(o, i, s * ld(u, i));
    }
  }
}

}  // namespace

extern "C" {

int64_t rkv_silu_mul(const Args* a) {
  switch (a->dtype) {
    case F32: run<float>(*a); return 0;
    case BF16: run<uint16_t>(*a); return 0;
    default: return 1;
  }
}

}  // extern "C"
