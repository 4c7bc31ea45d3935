// Fused RMSNorm rows for the CPU: y[n, :] = w * (x[n, :] / sqrt(mean(x[n, :]^2) + eps)).
//
// Built at first use by radixkv/model/norm_kernels.py and called through ctypes. torch's CPU
// F.rms_norm is a composite of ~7 elementwise / reduction ops, each a dispatch and a pass
// over memory: at decode (a few rows of 576) that costs ~15-40 us per call, 61 calls per
// token. Here it is one pass per row.
//
// Rounding follows the Hugging Face order for half dtypes: the row is normalised in float32,
// rounded to x's dtype, then multiplied by the weight and rounded again (as `weight *
// hidden.to(dtype)` does). Sums run in float32 in 16-wide partial sums, a different order
// than torch's, hence equal within float32 rounding.
//
// Optional residual add (fused): with `delta` given, x += delta is stored first (in x's
// dtype), and the normalised row is taken of the sum.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

enum DType : int64_t { F32 = 0, BF16 = 1 };

struct Args {
  int64_t N, H;
  int64_t dtype;
  int64_t x, x_s;        // [N, H] row stride x_s (elements); updated in place when delta != 0
  int64_t delta, d_s;    // [N, H] or 0
  int64_t w;             // [H] in x's dtype
  int64_t y, y_s;        // [N, H]
  double eps;
};

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline uint16_t f32_to_bf16(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // NaN stays NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}

constexpr int V = 16;

template <typename T> inline float get(const T* p, int64_t i);
template <> inline float get<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float get<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
template <typename T> inline void put(T* p, int64_t i, float v);
template <> inline void put<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void put<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = f32_to_bf16(v); }
template <typename T> inline float round_to(float v);
template <> inline float round_to<float>(float v) { return v; }
template <> inline float round_to<uint16_t>(float v) { return bf16_to_f32(f32_to_bf16(v)); }

template <typename T>
void run(const Args& a) {
  T* x = reinterpret_cast<T*>(a.x);
  const T* d = reinterpret_cast<const T*>(a.delta);
  const T* w = reinterpret_cast<const T*>(a.w);
  T* y = reinterpret_cast<T*>(a.y);
  const int64_t H = a.H;
  for (int64_t n = 0; n < a.N; ++n) {
    T* xr = x + n * a.x_s;
    if (d) {
      const T* dr = d + n * a.d_s;
      for (int64_t i = 0; i < H; ++i) put(xr, i, get(xr, i) + get(dr, i));
    }
    float part[V] = {0};
    int64_t i = 0;
    for (; i + V <= H; i += V)
      for (int j = 0; j < V; ++j) { float v = get(xr, i + j); part[j] += v * v; }
    float ss = 0.f;
    for (int j = 0; j < V; ++j) ss += part[j];
    for (; i < H; ++i) { float v = get(xr, i); ss += v * v; }
    const float inv = 1.0f / std::sqrt(ss / (float)H + (float)a.eps);
    T* yr = y + n * a.y_s;
    for (int64_t k = 0; k < H; ++k)
      put(yr, k, get(w, k) * round_to<T>(get(xr, k) * inv));
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an unsupported dtype.
int64_t rkv_rms_norm(const Args* a) {
  switch (a->dtype) {
    case F32: run<float>(*a); return 0;
    case BF16: run<uint16_t>(*a); return 0;
    default: return 1;
  }
}

}  // extern "C"
