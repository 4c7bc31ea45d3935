// Rotary position embedding in place, for the CPU: x[n, h, :] rotated by token n's angles
// (half-split pairs (i, i + D/2)): x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin.
//
// Built at first use by radixkv/model/rope_kernels.py and called through ctypes. torch needs
// seven ops (chunk, four products, a difference, a sum, a concatenation) and their temporaries
// for this; here it is one pass over q and k, in place in the fused qkv projection's output.
//
// Rounding equals torch's exactly: each product, then the sum or difference, is rounded to
// x's dtype as torch's elementwise ops do (built with -ffp-contract=off, so no FMA fuses a
// product into the sum). cos / sin are given in x's dtype, as the model hands them to torch.

#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

enum DType : int64_t { F32 = 0, BF16 = 1 };

struct Args {
  int64_t N, H, D;       // tokens, heads to rotate (q and k heads together), head dim
  int64_t dtype;
  int64_t x, x_s;        // [N, H, D]: row stride x_s between tokens, heads contiguous (D apart)
  int64_t cos, sin, c_s; // [N, D/2] each, row stride c_s
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
inline float rnd(float v, float*) { return v; }
inline float rnd(float v, uint16_t*) { return bf(to_bf(v)); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = to_bf(v); }

template <typename T>
void run(const Args& a) {
  T* x = reinterpret_cast<T*>(a.x);
  const T* cs = reinterpret_cast<const T*>(a.cos);
  const T* sn = reinterpret_cast<const T*>(a.sin);
  const int64_t half = a.D / 2;
  int nt = (int)(a.threads < 1 ? 1 : a.threads);
  if (a.N * a.H * a.D < (1 << 16)) nt = 1;  // decode-sized: a second thread costs more
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
  for (int64_t n = 0; n < a.N; ++n) {
    const T* c = cs + n * a.c_s;
    const T* s = sn + n * a.c_s;
    for (int64_t h = 0; h < a.H; ++h) {
      T* r = x + n * a.x_s + h * a.D;
      T* tag = nullptr;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = ld(r, i), x2 = ld(r, i + half), ci = ld(c, i), si = ld(s, i);
        const float a1 = rnd(x1 * ci, tag), b1 = rnd(x2 * si, tag);
        const float a2 = rnd(x2 * ci, tag), b2 = rnd(x1 * si, tag);
        st(r, i, a1 - b1);
        st(r, i + half, a2 + b2);
      }
    }
  }
}

// Rotation plus the pool write of a fused qkv row: heads [0, Hq + Hkv) of x (q, then k) are
// rotated in place, then heads [Hq, Hq + Hkv) (k, rotated) and [Hq + Hkv, Hq + 2 Hkv) (v) are
// copied into their token's slot of the layer's K / V buffers ([rows, Hkv, D], contiguous).
struct StoreArgs {
  Args rope;             // H = Hq + Hkv heads rotated
  int64_t hkv;           // KV heads
  int64_t slots;         // [N] int64
  int64_t rows;          // slots must lie in [0, rows)
  int64_t k_buf, v_buf;  // [rows, Hkv, D] each, in x's dtype
};

template <typename T>
void store_kv(const StoreArgs& a) {
  const Args& r = a.rope;
  const int64_t* slots = reinterpret_cast<const int64_t*>(a.slots);
  const T* x = reinterpret_cast<const T*>(r.x);
  T* kb = reinterpret_cast<T*>(a.k_buf);
  T* vb = reinterpret_cast<T*>(a.v_buf);
  const int64_t hq = r.H - a.hkv, width = a.hkv * r.D;  // elements of one K (or V) row
  for (int64_t n = 0; n < r.N; ++n) {
    const T* row = x + n * r.x_s;
    std::memcpy(kb + slots[n] * width, row + hq * r.D, sizeof(T) * width);
    std::memcpy(vb + slots[n] * width, row + (hq + a.hkv) * r.D, sizeof(T) * width);
  }
}

}  // namespace

extern "C" {

// rkv_rope, then the K / V rows into their slots. Returns 0, 1 for an unsupported dtype, or 2
// (nothing written, x untouched) when a slot is outside [0, rows).
int64_t rkv_rope_store(const StoreArgs* a) {
  const int64_t* slots = reinterpret_cast<const int64_t*>(a->slots);
  for (int64_t n = 0; n < a->rope.N; ++n)
    if ((uint64_t)slots[n] >= (uint64_t)a->rows) return 2;  // negative slots wrap to huge
  switch (a->rope.dtype) {
    case F32: run<float>(a->rope); store_kv<float>(*a); return 0;
    case BF16: run<uint16_t>(a->rope); store_kv<uint16_t>(*a); return 0;
    default: return 1;
  }
}

// Returns 0 on success, 1 for an unsupported dtype.
int64_t rkv_rope(const Args* a) {
  switch (a->dtype) {
    case F32: run<float>(*a); return 0;
    case BF16: run<uint16_t>(*a); return 0;
    default: return 1;
  }
}

}  // extern "C"
