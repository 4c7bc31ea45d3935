// Fused paged attention for the CPU: reads K/V rows straight from the pool through slot indices.
//
// Built at first use by radixkv/attention/cpu_kernels.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers, so it needs no torch or Python headers and compiles in
// about ten seconds of CPU time. Layouts (strides in elements, last dim contiguous):
//   q, o      [N, Hq, D]          row stride q_sn / o_sn, head stride q_sh / o_sh
//   k, v      [rows, Hkv, D]      slot stride k_ss / v_ss, head stride k_sh / v_sh
//   kv_indptr [B + 1], kv_indices [nnz]  (int64, CSR; request b reads slots
//             kv_indices[kv_indptr[b] : kv_indptr[b + 1]])
//   qo_indptr [B + 1]             (extend only: request b owns q rows qo_indptr[b] .. [b + 1])
// Query head h uses KV head h / (Hq / Hkv) (GQA/MQA without copying K/V).
//
// Softmax runs in base 2: q is pre-scaled by sm_scale * log2(e), so exp2 replaces exp. All
// accumulation is float32 whatever the storage dtype (float32, bfloat16 or float16).
//
// Quantized KV (int8, fp8 e4m3; radixkv/memory/kv_quant.py): K/V hold integers / fp8 codes and
// k_scale / v_scale [rows, Hkv] float32 hold one scale per (slot, KV head); q and o are then
// float32. Decode never widens a whole row times its scale: a K row's scale multiplies its
// 8 finished scores (q . (s k) = s (q . k)), a V row's scale multiplies its softmax weight, so
// the inner loops are one widening load (vpmovsxbd + vcvtdq2ps for int8) and one FMA per 8
// elements. Extend dequantizes each gathered K/V block into its float32 tile (compute bound).
// `rkv_quant_store` quantizes new K/V rows into their slots (the pool's set_kv).
//
// Return codes (0 = ok) are decoded into typed Python errors by cpu_kernels.py.

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
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
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef _Float16 vh __attribute__((vector_size(16)));
typedef int8_t vi8 __attribute__((vector_size(8)));
typedef uint8_t vu8 __attribute__((vector_size(8)));

struct bf16 { uint16_t bits; };
struct f8e4m3 { uint8_t bits; };  // float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits

enum DType : int { F32 = 0, BF16 = 1, F16 = 2, I8 = 3, F8E4M3 = 4 };

template <typename KT>
constexpr bool is_quant() { return std::is_same<KT, int8_t>::value || std::is_same<KT, f8e4m3>::value; }

enum Status : int64_t {
  OK = 0,
  BAD_INDPTR = 1,     // kv_indptr not non-decreasing, or outside [0, nnz]
  BAD_SLOT = 2,       // a kv index outside [0, rows)
  BAD_QO_INDPTR = 3,  // qo_indptr not non-decreasing, or its last entry != N
  BAD_EXTEND_LEN = 4, // a request has more new tokens than KV slots
  BAD_DTYPE = 5,
  BAD_REQ_LIST = 6,   // a request id in req_list outside [0, batch)
};

inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }

inline float hsum(vf v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// 2^x for x <= 0, with 2^x = 0 below -126 (masked scores are -inf). Range reduction to
// x = n + f, f in [-0.5, 0.5], then a degree-7 Taylor polynomial of e^(f ln 2): relative error
// ~5e-9, well under float32 rounding.
inline vf exp2v(vf x) {
  const vf lo = splat(-126.0f);
  vi underflow = x < lo;
  x = vmax(x, lo);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x + magic) - magic;
  vf f = x - n;
  vf p = splat(1.5252733804059840e-5f);
  p = p * f + splat(1.5403530393381606e-4f);
  p = p * f + splat(1.3333558146428443e-3f);
  p = p * f + splat(9.6181291076284772e-3f);
  p = p * f + splat(5.5504108664821580e-2f);
  p = p * f + splat(2.4022650695910072e-1f);
  p = p * f + splat(6.9314718055994531e-1f);
  p = p * f + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf r = p * (vf)e;
  return (vf)((vi)r & ~underflow);
}

inline float exp2s(float x) { return exp2v(splat(x))[0]; }

// ---- loads/stores with conversion to/from float32 -------------------------------------------
inline vf load(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline vf load(const bf16* p) {
  vu16 h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline vf load(const _Float16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vf);
}
// 8 bytes widened to 8 int32 lanes. GCC lowers __builtin_convertvector on 8-byte vectors to
// scalar byte moves and inserts (checked with objdump at -O3 -march=native), so AVX2 gets the
// one-instruction vpmovsxbd / vpmovzxbd with a memory operand explicitly.
inline vi widen_s8(const int8_t* p) {
#ifdef __AVX2__
  return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
  vi8 b; std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vi);
#endif
}
inline vu widen_u8(const uint8_t* p) {
#ifdef __AVX2__
  return (vu)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
  vu8 b; std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vu);
#endif
}
// int8 -> float32: one sign-extending widen and one convert (vpmovsxbd + vcvtdq2ps on AVX2).
inline vf load(const int8_t* p) { return __builtin_convertvector(widen_s8(p), vf); }
// fp8 e4m3 -> float32 without a table: exponent and mantissa shifted into a float's fields
// (bits << 20) read as a float equal to value * 2^-120, for normal and subnormal codes alike, so
// one multiply by 2^120 (exact) finishes it; then the sign bit. Code 0x7f (NaN) would read as
// 480: the quantizer never writes it.
inline vf load(const f8e4m3* p) {
  const vu x = widen_u8((const uint8_t*)p);
  const vf mag = (vf)((x & 0x7fu) << 20) * splat(0x1p120f);
  return (vf)((vu)mag | ((x & 0x80u) << 24));
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(bf16* p, vf v) {
  vu u = (vu)v;
  vu nan = (vu)(v != v);
  // Round to nearest even; NaN stays a (quiet) NaN.
  vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
  vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof h);
}
inline void store(_Float16* p, vf v) {
  vh h = __builtin_convertvector(v, vh);
  std::memcpy(p, &h, sizeof h);
}

// ---- AVX-512 (16 floats per vector) --------------------------------------------------------
// Built only with -march=native on an AVX-512 CPU; elsewhere (and for head_dim not a multiple
// of 16, or quantized KV) the 8-wide kernels above run. RADIXKV_CPU_AVX512=0 in the environment
// selects the 8-wide kernels on an AVX-512 CPU too (to test them there).
#ifdef __AVX512F__
constexpr int L = 16;  // floats per zmm vector

bool avx512_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("RADIXKV_CPU_AVX512");
    return !(e && e[0] == '0');
  }();
  return on;
}

inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 ld16(const bf16* p) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __m512 ld16(const _Float16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
inline void st16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// The rounding of the 8-wide store: nearest even, NaN stays a quiet NaN.
inline void st16(bf16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i odd = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}
inline void st16(_Float16* p, __m512 v) {
  _mm256_storeu_si256((__m256i*)p,
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// exp2v's polynomial 16 wide; 2^n is applied by vscalefps. 0 below -126 (and for -inf).
inline __m512 exp2x(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-126.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059840e-5f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-4f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910072e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#endif  // __AVX512F__

struct Args {
  int64_t n_q, batch, hq, hkv, d, rows, nnz;
  const void* q; int64_t q_sn, q_sh;
  const void* k; int64_t k_ss, k_sh;
  const void* v; int64_t v_ss, v_sh;
  void* o; int64_t o_sn, o_sh;
  const int64_t* kv_indptr;
  const int64_t* kv_indices;
  const int64_t* qo_indptr;  // extend only
  const int64_t* req_list;   // extend only: the requests to compute ...
  int64_t n_req_list;        // ... how many (< 0: all requests; req_list is then unused)
  double sm_scale;
  int64_t nthreads;
  const float* k_scale; int64_t ksc_ss, ksc_sh;  // quantized KV only: [rows, Hkv] scales
  const float* v_scale; int64_t vsc_ss, vsc_sh;
};  // every field is 8 bytes: cpu_kernels.py packs it with struct.pack("<24qdq6q")
static_assert(sizeof(Args) == 32 * 8, "Args must stay 32 packed 8-byte fields");

int64_t check_csr(const Args& a) {
  const int64_t* ip = a.kv_indptr;
  if (ip[0] < 0 || ip[a.batch] > a.nnz) return BAD_INDPTR;
  for (int64_t b = 0; b < a.batch; ++b)
    if (ip[b + 1] < ip[b]) return BAD_INDPTR;
  int64_t bad = 0;
  const int64_t lo = ip[0], hi = ip[a.batch];
  for (int64_t i = lo; i < hi; ++i) {
    uint64_t s = (uint64_t)a.kv_indices[i];
    bad |= s >= (uint64_t)a.rows;  // negative slots wrap to huge values
  }
  return bad ? BAD_SLOT : OK;
}

int nthreads_of(const Args& a) { return a.nthreads > 0 ? (int)a.nthreads : 1; }

// Below this many multiply-adds a call runs single-threaded (an OpenMP fork/join costs a few
// microseconds, about this much work).
constexpr int64_t PAR_MIN_WORK = 1 << 16;

// ---- decode -------------------------------------------------------------------------------
// One task = one request's chunk of KV tokens, all heads at once, so each K/V row (all KV heads
// of a slot, contiguous in the pool) is read from memory exactly once. Long requests are split
// into chunks whose partial (max, sum, acc) are merged afterwards (log-sum-exp combine).

constexpr int DEC_BLK = 64;  // tokens scored before one softmax rescale (a multiple of W)

struct Partial { float* m; float* l; float* acc; };  // [Hq], [Hq], [Hq, D]

// r[u] = sum of the lanes of a[u], u = 0..7: a transposing add tree, ~4x cheaper than 8 hsums.
inline vf reduce8(const vf* a) {
  auto hadd = [](vf x, vf y) {
    return __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14) +
           __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15);
  };
  const vf u0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));  // [a0..a3 low | a0..a3 high]
  const vf u1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// Scores of 8 tokens for one query head: 8 accumulators along D, then one transposing reduce.
template <typename T, int DV>
inline vf score8(const float* qp, const T* const* kp, int dv_rt) {
  const int dv = DV ? DV : dv_rt;
  vf acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = splat(0.f);
  for (int j = 0; j < dv; ++j) {
    const vf qj = load(qp + j * W);
    for (int u = 0; u < 8; ++u) acc[u] += qj * load(kp[u] + j * W);
  }
  return reduce8(acc);
}

template <typename KT, int DV>
void decode_chunk(const Args& a, int dv_rt, const float* qs, int64_t beg, int64_t end,
                  Partial out, float* s /* [Hq, DEC_BLK] */) {
  const int dv = DV ? DV : dv_rt;
  const int64_t hq = a.hq, hkv = a.hkv, g = hq / hkv, d = a.d;
  const KT* kb = (const KT*)a.k;
  const KT* vb = (const KT*)a.v;
  constexpr bool Q = is_quant<KT>();
  for (int64_t h = 0; h < hq; ++h) {
    out.m[h] = -__builtin_inff();
    out.l[h] = 0.f;
    std::memset(out.acc + h * d, 0, sizeof(float) * d);
  }
  for (int64_t t0 = beg; t0 < end; t0 += DEC_BLK) {
    const int n = (int)(end - t0 < DEC_BLK ? end - t0 : DEC_BLK);
    const int n8 = (n + 7) & ~7;
    const int64_t* idx = a.kv_indices + t0;
    // Scores s[h, t] = q_h . k_t (q already scaled into base 2), 8 tokens at a time; the
    // tail group repeats the last token and its scores are masked to -inf below.
    for (int t = 0; t < n8; t += 8) {
      for (int64_t hk = 0; hk < hkv; ++hk) {
        const KT* kp[8];
        vf ksc = splat(1.f);  // the 8 tokens' K scales (quantized KV)
        for (int u = 0; u < 8; ++u) {
          const int tu = t + u < n ? t + u : n - 1;
          kp[u] = kb + idx[tu] * a.k_ss + hk * a.k_sh;
          if (Q) ksc[u] = a.k_scale[idx[tu] * a.ksc_ss + hk * a.ksc_sh];
        }
        for (int64_t gi = 0; gi < g; ++gi) {
          const int64_t h = hk * g + gi;
          vf sc = score8<KT, DV>(qs + h * d, kp, dv_rt);
          if (Q) sc *= ksc;
          store(s + h * DEC_BLK + t, sc);
        }
      }
    }
    // Online softmax: rescale the running sums once per block.
    for (int64_t h = 0; h < hq; ++h) {
      float* sh = s + h * DEC_BLK;
      for (int t = n; t < n8; ++t) sh[t] = -__builtin_inff();
      vf mv = load(sh);
      for (int t = W; t < n8; t += W) mv = vmax(mv, load(sh + t));
      const float mb = hmax(mv);
      const float m_new = mb > out.m[h] ? mb : out.m[h];
      const float alpha = exp2s(out.m[h] - m_new);
      out.m[h] = m_new;
      vf ls = splat(0.f);
      for (int t = 0; t < n8; t += W) {
        const vf p = exp2v(load(sh + t) - splat(m_new));
        store(sh + t, p);
        ls += p;
      }
      out.l[h] = out.l[h] * alpha + hsum(ls);
      if (alpha != 1.f) {
        float* ah = out.acc + h * d;
        for (int j = 0; j < dv; ++j) store(ah + j * W, load(ah + j * W) * splat(alpha));
      }
    }
    // acc_h += sum_t p[h, t] * v_t, one head at a time so acc_h stays in registers. With
    // quantized KV, p[h, t] times v_t's scale weighs the raw codes (l keeps the plain sum).
    for (int64_t hk = 0; hk < hkv; ++hk) {
      if (Q) {
        for (int64_t gi = 0; gi < g; ++gi) {
          float* ph = s + (hk * g + gi) * DEC_BLK;
          for (int t = 0; t < n; ++t) ph[t] *= a.v_scale[idx[t] * a.vsc_ss + hk * a.vsc_sh];
        }
      }
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t h = hk * g + gi;
        float* ah = out.acc + h * d;
        const float* ph = s + h * DEC_BLK;
        if (DV) {
          vf acc[DV ? DV : 1];
          for (int j = 0; j < DV; ++j) acc[j] = load(ah + j * W);
          for (int t = 0; t < n; ++t) {
            const KT* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
            const vf p = splat(ph[t]);
            for (int j = 0; j < DV; ++j) acc[j] += p * load(vp + j * W);
          }
          for (int j = 0; j < DV; ++j) store(ah + j * W, acc[j]);
        } else {
          for (int t = 0; t < n; ++t) {
            const KT* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
            const vf p = splat(ph[t]);
            for (int j = 0; j < dv; ++j) store(ah + j * W, load(ah + j * W) + p * load(vp + j * W));
          }
        }
      }
    }
  }
}

#ifdef __AVX512F__
// ---- decode, 16 wide ------------------------------------------------------------------------
// The chunk walk of decode_chunk, per KV head: the block's K/V rows of that head (read from the
// pool for float32, widened once into a float32 tile otherwise) serve its G query heads. Scores
// of 16 tokens for one head come from 16 accumulators along D and one transposing reduce
// (x_reduce16); P @ V keeps up to 6 heads x 4 column vectors in registers. The next block's
// rows are prefetched while this one computes (slots are scattered: no hardware prefetcher
// can guess them).

// Sum of the lanes of a[j] for j < 16, returned in lane 4 * (j % 4) + j / 4 (the order the
// shuffle tree leaves them in; callers feed token 4 * (j % 4) + j / 4 as a[j], so lane i holds
// token i).
inline __m512 x_reduce16(const __m512* a) {
  __m512 b[8], c[4], e[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: [a0 | a1] partial sums of 8
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // 128-bit chunk k holds 4 partial sums of a[4 i + k]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  for (int i = 0; i < 2; ++i)
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(c[2 * i], c[2 * i + 1], 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xdd));
}

// s[i] = q . kr[i] for the 16 rows kr[0 .. 16) (float32, D = 16 NC).
template <int NC, typename E>
inline void x_score16(const float* q, const E* const* kr, float* s) {
  __m512 qv[NC], acc[16];
  for (int c = 0; c < NC; ++c) qv[c] = _mm512_loadu_ps(q + c * L);
  for (int j = 0; j < 16; ++j) {
    const E* k = kr[4 * (j % 4) + j / 4];
    __m512 x = _mm512_mul_ps(qv[0], ld16(k));
    for (int c = 1; c < NC; ++c) x = _mm512_fmadd_ps(qv[c], ld16(k + c * L), x);
    acc[j] = x;
  }
  _mm512_storeu_ps(s, x_reduce16(acc));
}

template <typename E>
inline void x_score16_any(int nc, const float* q, const E* const* kr, float* s) {
  switch (nc) {
    case 4: x_score16<4, E>(q, kr, s); break;
    case 8: x_score16<8, E>(q, kr, s); break;
    case 1: x_score16<1, E>(q, kr, s); break;
    case 2: x_score16<2, E>(q, kr, s); break;
    case 3: x_score16<3, E>(q, kr, s); break;
    case 5: x_score16<5, E>(q, kr, s); break;
    case 6: x_score16<6, E>(q, kr, s); break;
    case 7: x_score16<7, E>(q, kr, s); break;
    default: {  // D > 128: partial sums over 128-column slices
      alignas(64) float part[L];
      for (int i = 0; i < L; ++i) s[i] = 0.f;
      const E* kk[16];
      for (int c0 = 0; c0 < nc; c0 += 8) {
        const int w = nc - c0 < 8 ? nc - c0 : 8;
        for (int i = 0; i < 16; ++i) kk[i] = kr[i] + c0 * L;
        x_score16_any(w, q + c0 * L, kk, part);
        for (int i = 0; i < L; ++i) s[i] += part[i];
      }
    }
  }
}

// acc[h][c + 16 k] = acc[h][...] * alpha[h] + sum_t p[h * DEC_BLK + t] * vr[t][c + 16 k].
template <int NH, int NC, typename E>
inline void x_dpv(float* acc, int64_t d, const float* p, const E* const* vr, int n,
                  const float* alpha, int64_t c) {
  __m512 o[NH][NC];
  for (int h = 0; h < NH; ++h) {
    const __m512 al = _mm512_set1_ps(alpha[h]);
    for (int k = 0; k < NC; ++k)
      o[h][k] = _mm512_mul_ps(_mm512_loadu_ps(acc + h * d + c + k * L), al);
  }
  for (int t = 0; t < n; ++t) {
    __m512 vv[NC];
    for (int k = 0; k < NC; ++k) vv[k] = ld16(vr[t] + c + k * L);
    for (int h = 0; h < NH; ++h) {
      const __m512 pb = _mm512_set1_ps(p[h * DEC_BLK + t]);
      for (int k = 0; k < NC; ++k) o[h][k] = _mm512_fmadd_ps(pb, vv[k], o[h][k]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(acc + h * d + c + k * L, o[h][k]);
}

template <int NH, typename E>
inline void x_dpv_cols(float* acc, int64_t d, const float* p, const E* const* vr, int n,
                       const float* alpha) {
  int64_t c = 0;
  for (; c + 4 * L <= d; c += 4 * L) x_dpv<NH, 4, E>(acc, d, p, vr, n, alpha, c);
  switch ((d - c) / L) {
    case 3: x_dpv<NH, 3, E>(acc, d, p, vr, n, alpha, c); break;
    case 2: x_dpv<NH, 2, E>(acc, d, p, vr, n, alpha, c); break;
    case 1: x_dpv<NH, 1, E>(acc, d, p, vr, n, alpha, c); break;
    default: break;
  }
}

template <typename T>
inline void x_prefetch_slots(const Args& a, const int64_t* idx, int n) {
  const int64_t bytes = a.d * (int64_t)sizeof(T);
  for (int t = 0; t < n; ++t)
    for (int64_t hk = 0; hk < a.hkv; ++hk) {
      const char* kp = (const char*)((const T*)a.k + idx[t] * a.k_ss + hk * a.k_sh);
      const char* vp = (const char*)((const T*)a.v + idx[t] * a.v_ss + hk * a.v_sh);
      for (int64_t off = 0; off < bytes; off += 64) {
        _mm_prefetch(kp + off, _MM_HINT_T0);
        _mm_prefetch(vp + off, _MM_HINT_T0);
      }
    }
}

// decode_chunk for float K/V with D % 16 == 0. tile: 2 DEC_BLK D floats (half K/V only).
template <typename T>
void x_decode_chunk(const Args& a, const float* qs, int64_t beg, int64_t end, Partial out,
                    float* s /* [Hq, DEC_BLK] */, float* tile) {
  const int64_t hq = a.hq, hkv = a.hkv, g = hq / hkv, d = a.d;
  const int nc = (int)(d / L);
  const T* kb = (const T*)a.k;
  const T* vb = (const T*)a.v;
  for (int64_t h = 0; h < hq; ++h) {
    out.m[h] = -__builtin_inff();
    out.l[h] = 0.f;
    std::memset(out.acc + h * d, 0, sizeof(float) * d);
  }
  // Rows are read in place for float32 K/V, from the widened tile otherwise (reading half
  // rows in place, widening per query head, measured slower at batch 8-32).
  using E = float;
  constexpr bool DIRECT = std::is_same<T, float>::value;
  const E* kr[DEC_BLK + 16];
  const E* vr[DEC_BLK];
  alignas(64) float alpha[64];  // g <= 64 (decode_impl checks)
  x_prefetch_slots<T>(a, a.kv_indices + beg, (int)(end - beg < DEC_BLK ? end - beg : DEC_BLK));
  for (int64_t t0 = beg; t0 < end; t0 += DEC_BLK) {
    const int n = (int)(end - t0 < DEC_BLK ? end - t0 : DEC_BLK);
    const int n16 = (n + 15) & ~15;
    const int64_t* idx = a.kv_indices + t0;
    if (t0 + DEC_BLK < end)
      x_prefetch_slots<T>(a, idx + DEC_BLK,
                          (int)(end - t0 - DEC_BLK < DEC_BLK ? end - t0 - DEC_BLK : DEC_BLK));
    for (int64_t hk = 0; hk < hkv; ++hk) {
      for (int t = 0; t < n; ++t) {
        const T* kp = kb + idx[t] * a.k_ss + hk * a.k_sh;
        const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
        if (DIRECT) {
          kr[t] = (const E*)kp;
          vr[t] = (const E*)vp;
        } else {
          float* kt = tile + t * d;
          float* vt = tile + (DEC_BLK + t) * d;
          for (int64_t j = 0; j < d; j += L) {
            _mm512_store_ps(kt + j, ld16(kp + j));
            _mm512_store_ps(vt + j, ld16(vp + j));
          }
          kr[t] = (const E*)kt;
          vr[t] = (const E*)vt;
        }
      }
      for (int t = n; t < n16; ++t) kr[t] = kr[n - 1];  // scored, then masked
      float* sh0 = s + hk * g * DEC_BLK;
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t h = hk * g + gi;
        float* sh = sh0 + gi * DEC_BLK;
        for (int t = 0; t < n16; t += 16) x_score16_any(nc, qs + h * d, kr + t, sh + t);
        // Online softmax of this head's block.
        const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
        if (n < n16) {
          const __mmask16 keep = (__mmask16)((1u << (n & 15)) - 1);
          float* last = sh + n16 - 16;
          _mm512_storeu_ps(last, _mm512_mask_mov_ps(ninf, keep, _mm512_loadu_ps(last)));
        }
        __m512 mv = _mm512_loadu_ps(sh);
        for (int t = 16; t < n16; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sh + t));
        const float mb = _mm512_reduce_max_ps(mv);
        const float m_new = mb > out.m[h] ? mb : out.m[h];
        const __m512 mn = _mm512_set1_ps(m_new);
        alpha[gi] = _mm512_cvtss_f32(exp2x(_mm512_set1_ps(out.m[h] - m_new)));
        out.m[h] = m_new;
        __m512 ls = _mm512_setzero_ps();
        for (int t = 0; t < n16; t += 16) {
          const __m512 p = exp2x(_mm512_sub_ps(_mm512_loadu_ps(sh + t), mn));
          _mm512_storeu_ps(sh + t, p);
          ls = _mm512_add_ps(ls, p);
        }
        out.l[h] = out.l[h] * alpha[gi] + _mm512_reduce_add_ps(ls);
      }
      // acc_h = acc_h * alpha_h + P_h @ V for this KV head's query heads, 6 at a time.
      float* acc = out.acc + hk * g * d;
      int64_t h = 0;
      for (; h + 6 <= g; h += 6)
        x_dpv_cols<6>(acc + h * d, d, sh0 + h * DEC_BLK, vr, n, alpha + h);
      float* ah = acc + h * d;
      const float* ph = sh0 + h * DEC_BLK;
      switch (g - h) {
        case 5: x_dpv_cols<5>(ah, d, ph, vr, n, alpha + h); break;
        case 4: x_dpv_cols<4>(ah, d, ph, vr, n, alpha + h); break;
        case 3: x_dpv_cols<3>(ah, d, ph, vr, n, alpha + h); break;
        case 2: x_dpv_cols<2>(ah, d, ph, vr, n, alpha + h); break;
        case 1: x_dpv_cols<1>(ah, d, ph, vr, n, alpha + h); break;
        default: break;
      }
    }
  }
}
#endif  // __AVX512F__

template <typename T>
void load_q(const Args& a, int64_t row, float scale, float* qs) {
  const T* qb = (const T*)a.q + row * a.q_sn;
  for (int64_t h = 0; h < a.hq; ++h)
    for (int64_t j = 0; j < a.d; j += W) store(qs + h * a.d + j, load(qb + h * a.q_sh + j) * splat(scale));
}

template <typename T>
void store_o(const Args& a, int64_t row, const float* m_unused, const float* l, const float* acc) {
  (void)m_unused;
  T* ob = (T*)a.o + row * a.o_sn;
  for (int64_t h = 0; h < a.hq; ++h) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // an empty request gets zeros
    for (int64_t j = 0; j < a.d; j += W)
      store(ob + h * a.o_sh + j, load(acc + h * a.d + j) * splat(inv));
  }
}

template <typename T, typename KT, int DV>
int64_t decode_impl(const Args& a) {
  const int64_t B = a.batch, hq = a.hq, d = a.d;
  const int nt = nthreads_of(a);
  const float scale = (float)(a.sm_scale * 1.4426950408889634);
  // Chunking: enough tasks to balance ragged lengths over the threads, but chunks long enough
  // that the merge and per-chunk setup stay negligible.
  const int64_t total = a.kv_indptr[B] - a.kv_indptr[0];
  int64_t chunk = nt > 1 ? (total + 4 * nt - 1) / (4 * nt) : total;
  if (chunk < 256) chunk = 256;
  chunk = (chunk + DEC_BLK - 1) / DEC_BLK * DEC_BLK;
  std::vector<int64_t> task_start(B + 1);
  task_start[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = a.kv_indptr[b + 1] - a.kv_indptr[b];
    const int64_t nchunks = len <= chunk ? 1 : (len + chunk - 1) / chunk;
    task_start[b + 1] = task_start[b] + nchunks;
  }
  const int64_t ntasks = task_start[B];
  // Partial results of every task: m [Hq], l [Hq], acc [Hq, D].
  const int64_t pstride = hq * (d + 2);
  std::vector<float> part((size_t)(ntasks * pstride));

  // Chunks still to finish per request: whoever finishes a request's last chunk merges its
  // partials and writes o, so the only barrier is the one ending the parallel region (a
  // barrier per call matters on an oversubscribed machine, where each can cost a time slice).
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[B]);
  for (int64_t b = 0; b < B; ++b) left[b].store(task_start[b + 1] - task_start[b]);

  // Tiny batches run on the calling thread: waking the pool costs more than the work.
  const bool par = nt > 1 && ntasks > 1 && total * hq * d >= PAR_MIN_WORK;
#pragma omp parallel num_threads(nt) if (par)
  {
    std::vector<float> qs((size_t)(hq * d)), s((size_t)(hq * DEC_BLK));
#ifdef __AVX512F__
    // The 16-wide chunk walk: float K/V, D % 16 == 0; its widening tile for half K/V.
    const bool x16 = std::is_same<T, KT>::value && d % L == 0 && hq / a.hkv <= 64 &&
                     avx512_enabled();
    std::unique_ptr<float[]> tile(x16 && !std::is_same<T, float>::value
                                      ? new float[(size_t)(2 * DEC_BLK * d + 16)] : nullptr);
    float* tile_p = (float*)(((uintptr_t)tile.get() + 63) & ~(uintptr_t)63);
#endif
    std::vector<float> l((size_t)hq), acc((size_t)(hq * d));
    int64_t q_row = -1;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t task = 0; task < ntasks; ++task) {
      int64_t lo = 0, hi = B;  // the request of this task: first b with task_start[b + 1] > task
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (task_start[mid + 1] > task) hi = mid; else lo = mid + 1;
      }
      const int64_t b = lo;
      const int64_t c = task - task_start[b];
      const int64_t beg = a.kv_indptr[b] + c * chunk;
      int64_t end = beg + chunk;
      if (end > a.kv_indptr[b + 1]) end = a.kv_indptr[b + 1];
      if (q_row != b) { load_q<T>(a, b, scale, qs.data()); q_row = b; }
      float* p = part.data() + task * pstride;
      Partial out{p, p + hq, p + 2 * hq};
#ifdef __AVX512F__
      if (x16) x_decode_chunk<T>(a, qs.data(), beg, end, out, s.data(), tile_p);
      else
#endif
      decode_chunk<KT, DV>(a, (int)(d / W), qs.data(), beg, end, out, s.data());
      // acq_rel: the last finisher sees every other chunk's partials.
      if (left[b].fetch_sub(1, std::memory_order_acq_rel) != 1) continue;
      const int64_t t0 = task_start[b], t1 = task_start[b + 1];
      const float* p0 = part.data() + t0 * pstride;
      if (t1 - t0 == 1) { store_o<T>(a, b, p0, p0 + hq, p0 + 2 * hq); continue; }
      // Log-sum-exp merge of the request's chunks.
      for (int64_t h = 0; h < hq; ++h) {
        float mx = -__builtin_inff();
        for (int64_t t = t0; t < t1; ++t) {
          const float mt = part[(size_t)(t * pstride + h)];
          mx = mt > mx ? mt : mx;
        }
        float lsum = 0.f;
        float* ah = acc.data() + h * d;
        std::memset(ah, 0, sizeof(float) * d);
        for (int64_t t = t0; t < t1; ++t) {
          const float* pt = part.data() + t * pstride;
          const float w = pt[h] == -__builtin_inff() ? 0.f : exp2s(pt[h] - mx);
          lsum += w * pt[hq + h];
          const float* at = pt + 2 * hq + h * d;
          for (int64_t j = 0; j < d; j += W) store(ah + j, load(ah + j) + splat(w) * load(at + j));
        }
        l[h] = lsum;
      }
      store_o<T>(a, b, nullptr, l.data(), acc.data());
    }
  }
  return OK;
}

// ---- extend -------------------------------------------------------------------------------
// One task = (request, tile of up to EXT_BM new tokens, KV head). The tile's rows are its
// queries times the query heads sharing that KV head, so each K/V block gathered from the pool
// (and widened to float32 once) serves G heads. Scores are dot products along D, two rows by
// four tokens at a time (8 vector accumulators, one transposing reduce); P @ V keeps three
// output rows by 32 columns in registers.

constexpr int EXT_BM = 16;  // queries per tile
constexpr int EXT_BN = 64;  // KV tokens per block (a multiple of 4)

// sc[r, t] for r in {r0, r1}, t in [t, t + 4): q rows are q0 / q1, K rows kf + t * d.
template <int DV>
inline void score2x4(const float* q0, const float* q1, const float* kf, int64_t d, int dv_rt,
                     float* s0, float* s1) {
  const int dv = DV ? DV : dv_rt;
  vf acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = splat(0.f);
  for (int j = 0; j < dv; ++j) {
    const vf a0 = load(q0 + j * W), a1 = load(q1 + j * W);
    for (int u = 0; u < 4; ++u) {
      const vf kv = load(kf + u * d + j * W);
      acc[u] += a0 * kv;
      acc[4 + u] += a1 * kv;
    }
  }
  const vf r = reduce8(acc);  // [row0 t0..t3 | row1 t0..t3]
  for (int u = 0; u < 4; ++u) { s0[u] = r[u]; s1[u] = r[4 + u]; }
}

// o[r, c .. c + 32) += sum_t p[r, t] * v[t, c .. c + 32) for NR rows (NR <= 3).
template <int NR>
inline void pv_rows(float* const* o, const float* const* p, const float* vt, int64_t d,
                    int64_t c, int n) {
  vf acc[NR][4];
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < 4; ++u) acc[r][u] = load(o[r] + c + u * W);
  for (int t = 0; t < n; ++t) {
    const float* vr = vt + t * d + c;
    const vf v0 = load(vr), v1 = load(vr + W), v2 = load(vr + 2 * W), v3 = load(vr + 3 * W);
    for (int r = 0; r < NR; ++r) {
      const vf pr = splat(p[r][t]);
      acc[r][0] += pr * v0;
      acc[r][1] += pr * v1;
      acc[r][2] += pr * v2;
      acc[r][3] += pr * v3;
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < 4; ++u) store(o[r] + c + u * W, acc[r][u]);
}

template <typename T, typename KT, int DV>
void extend_tile(const Args& a, int dv_rt, int64_t b, int64_t qt0, int64_t qt1, int64_t hk,
                 float* qs, float* sc, float* kf, float* vt, float* acc, float* m, float* l) {
  const int64_t g = a.hq / a.hkv, d = a.d;
  const int64_t q_beg = a.qo_indptr[b], n_new = a.qo_indptr[b + 1] - q_beg;
  const int64_t kv0 = a.kv_indptr[b], kv_len = a.kv_indptr[b + 1] - kv0;
  const int64_t prefix = kv_len - n_new;
  const int64_t nq = qt1 - qt0, R = nq * g;  // rows: r = qi * g + gi
  const int64_t R2 = (R + 1) & ~(int64_t)1;  // scores are computed for row pairs
  const float scale = (float)(a.sm_scale * 1.4426950408889634);
  const KT* kb = (const KT*)a.k;
  const KT* vb = (const KT*)a.v;
  const T* qb = (const T*)a.q;
  constexpr bool Q = is_quant<KT>();
  for (int64_t qi = 0; qi < nq; ++qi)
    for (int64_t gi = 0; gi < g; ++gi) {
      const T* src = qb + (q_beg + qt0 + qi) * a.q_sn + (hk * g + gi) * a.q_sh;
      float* dst = qs + (qi * g + gi) * d;
      for (int64_t j = 0; j < d; j += W) store(dst + j, load(src + j) * splat(scale));
    }
  if (R2 > R) std::memset(qs + R * d, 0, sizeof(float) * d);  // the odd row's partner
  for (int64_t r = 0; r < R; ++r) { m[r] = -__builtin_inff(); l[r] = 0.f; }
  std::memset(acc, 0, sizeof(float) * R * d);
  // Query qi sits at position prefix + qt0 + qi and sees positions 0 .. that position.
  const int64_t kv_end = prefix + qt1;
  for (int64_t j0 = 0; j0 < kv_end; j0 += EXT_BN) {
    const int n = (int)(kv_end - j0 < EXT_BN ? kv_end - j0 : EXT_BN);
    const int n4 = (n + 3) & ~3;
    const int64_t* idx = a.kv_indices + kv0 + j0;
    // Gather this block's K and V rows of head hk from the pool, widened to float32 (and
    // dequantized: the tile is reused by every row of the tile, so scaling it once is cheapest).
    for (int t = 0; t < n; ++t) {
      const KT* kp = kb + idx[t] * a.k_ss + hk * a.k_sh;
      const KT* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
      if (Q) {
        const vf ks = splat(a.k_scale[idx[t] * a.ksc_ss + hk * a.ksc_sh]);
        const vf vs = splat(a.v_scale[idx[t] * a.vsc_ss + hk * a.vsc_sh]);
        for (int64_t j = 0; j < d; j += W) {
          store(kf + t * d + j, load(kp + j) * ks);
          store(vt + t * d + j, load(vp + j) * vs);
        }
        continue;
      }
      for (int64_t j = 0; j < d; j += W) {
        store(kf + t * d + j, load(kp + j));
        store(vt + t * d + j, load(vp + j));
      }
    }
    for (int t = n; t < n4; ++t) std::memset(kf + t * d, 0, sizeof(float) * d);
    // Does this block cross the causal diagonal of any row of the tile?
    const bool masked = j0 + n - 1 > prefix + qt0;
    for (int64_t r = 0; r < R2; r += 2)
      for (int t = 0; t < n4; t += 4)
        score2x4<DV>(qs + r * d, qs + (r + 1) * d, kf + t * d, d, dv_rt,
                     sc + r * EXT_BN + t, sc + (r + 1) * EXT_BN + t);
    // Causal mask and online softmax, row by row.
    const int n8 = (n + 7) & ~7;
    int nvis_all = 0;
    for (int64_t r = 0; r < R; ++r) {
      float* sr = sc + r * EXT_BN;
      int nvis = n;
      if (masked) {
        const int64_t lim = prefix + qt0 + r / g - j0 + 1;  // columns t < lim are visible
        nvis = lim < n ? (int)(lim > 0 ? lim : 0) : n;
      }
      if (nvis == 0) {  // the whole block is in this row's future: p = 0
        std::memset(sr, 0, sizeof(float) * n8);
        continue;
      }
      for (int t = nvis; t < n8; ++t) sr[t] = -__builtin_inff();
      nvis_all = nvis > nvis_all ? nvis : nvis_all;
      vf mv = load(sr);
      for (int t = W; t < n8; t += W) mv = vmax(mv, load(sr + t));
      const float mb = hmax(mv);
      const float m_new = mb > m[r] ? mb : m[r];
      const float alpha = exp2s(m[r] - m_new);
      m[r] = m_new;
      vf ls = splat(0.f);
      for (int t = 0; t < n8; t += W) {
        const vf p = exp2v(load(sr + t) - splat(m_new));
        store(sr + t, p);
        ls += p;
      }
      l[r] = l[r] * alpha + hsum(ls);
      if (alpha != 1.f) {
        float* ar = acc + r * d;
        for (int64_t j = 0; j < d; j += W) store(ar + j, load(ar + j) * splat(alpha));
      }
    }
    // acc += P @ V, three rows by 32 columns at a time (masked entries of P are zero).
    if (d % (4 * W) == 0) {
      for (int64_t r = 0; r < R; r += 3) {
        const int nr = (int)(R - r < 3 ? R - r : 3);
        float* o[3] = {acc + r * d, acc + (r + 1) * d, acc + (r + 2) * d};
        const float* p[3] = {sc + r * EXT_BN, sc + (r + 1) * EXT_BN, sc + (r + 2) * EXT_BN};
        for (int64_t c = 0; c < d; c += 4 * W) {
          if (nr == 3) pv_rows<3>(o, p, vt, d, c, nvis_all);
          else if (nr == 2) pv_rows<2>(o, p, vt, d, c, nvis_all);
          else pv_rows<1>(o, p, vt, d, c, nvis_all);
        }
      }
    } else {
      for (int64_t r = 0; r < R; ++r) {
        float* ar = acc + r * d;
        const float* pr = sc + r * EXT_BN;
        for (int t = 0; t < nvis_all; ++t) {
          const vf pv = splat(pr[t]);
          for (int64_t j = 0; j < d; j += W) store(ar + j, load(ar + j) + pv * load(vt + t * d + j));
        }
      }
    }
  }
  T* ob = (T*)a.o;
  for (int64_t qi = 0; qi < nq; ++qi)
    for (int64_t gi = 0; gi < g; ++gi) {
      const int64_t r = qi * g + gi;
      const float inv = 1.f / l[r];
      T* dst = ob + (q_beg + qt0 + qi) * a.o_sn + (hk * g + gi) * a.o_sh;
      for (int64_t j = 0; j < d; j += W) store(dst + j, load(acc + r * d + j) * splat(inv));
    }
}

// Runs fn(ws, b, qt0, qt1, hk) for every task (request b, its new tokens qt0 .. qt1 in tiles of
// bm, KV head hk) over the threads; ws = init() is each thread's workspace.
template <typename Init, typename Fn>
void for_each_tile(const Args& a, int64_t bm, int64_t bn, Init init, Fn fn) {
  // Requests to compute: all, or the caller's subset (the rest go to another path).
  const bool subset = a.n_req_list >= 0;
  const int64_t B = subset ? a.n_req_list : a.batch;
  auto req = [&](int64_t i) { return subset ? a.req_list[i] : i; };
  // Tasks: (request, query tile) pairs times KV heads.
  std::vector<int64_t> tile_start(B + 1);
  tile_start[0] = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t b = req(i);
    const int64_t n_new = a.qo_indptr[b + 1] - a.qo_indptr[b];
    tile_start[i + 1] = tile_start[i] + (n_new + bm - 1) / bm;
  }
  const int64_t ntiles = tile_start[B], ntasks = ntiles * a.hkv;
  const int nt = nthreads_of(a);
  const bool par = nt > 1 && ntasks > 1 && a.n_q * a.hq * a.d * bn >= PAR_MIN_WORK;
#pragma omp parallel num_threads(nt) if (par)
  {
    auto ws = init();
    // Later tiles of a request see more KV (causal), so hand out tasks from the end first.
#pragma omp for schedule(dynamic, 1) nowait  // the region end is the only barrier
    for (int64_t rev = 0; rev < ntasks; ++rev) {
      const int64_t task = ntasks - 1 - rev;
      const int64_t tile = task / a.hkv, hk = task % a.hkv;
      int64_t lo = 0, hi = B;
      while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (tile_start[mid + 1] > tile) hi = mid; else lo = mid + 1;
      }
      const int64_t b = req(lo);
      const int64_t n_new = a.qo_indptr[b + 1] - a.qo_indptr[b];
      const int64_t qt0 = (tile - tile_start[lo]) * bm;
      const int64_t qt1 = qt0 + bm < n_new ? qt0 + bm : n_new;
      fn(ws, b, qt0, qt1, hk);
    }
  }
}

template <typename T, typename KT, int DV>
int64_t extend_impl8(const Args& a) {
  const int64_t g = a.hq / a.hkv, d = a.d;
  struct Ws { std::vector<float> qs, sc, kf, vt, acc, m, l; };
  auto init = [&] {
    const int64_t R = EXT_BM * g + 1;  // + 1: the partner of an odd last row
    return Ws{std::vector<float>((size_t)(R * d)), std::vector<float>((size_t)(R * EXT_BN)),
              std::vector<float>((size_t)(d * EXT_BN)), std::vector<float>((size_t)(EXT_BN * d)),
              std::vector<float>((size_t)(R * d)), std::vector<float>((size_t)R),
              std::vector<float>((size_t)R)};
  };
  for_each_tile(a, EXT_BM, EXT_BN, init,
                [&](Ws& w, int64_t b, int64_t qt0, int64_t qt1, int64_t hk) {
    extend_tile<T, KT, DV>(a, (int)(d / W), b, qt0, qt1, hk, w.qs.data(), w.sc.data(),
                           w.kf.data(), w.vt.data(), w.acc.data(), w.m.data(), w.l.data());
  });
  return OK;
}

#ifdef __AVX2__
// ---- extend without horizontal reductions: pieces shared by the 16- and 8-wide kernels -----
constexpr int X_BN = 64;    // KV tokens per block
constexpr int X_PAD = 16;   // spare rows after a block (the token micro-kernel's tail)

// Queries per tile: enough for >= 3 row vectors; with G >= 3, 32 queries (each K/V block
// gathered half as often) when that still leaves 8 tasks per thread, else 16.
int64_t x_bm(const Args& a, int64_t g) {
  if (g == 1) return 48;
  if (g == 2) return 32;
  const bool subset = a.n_req_list >= 0;
  const int64_t B = subset ? a.n_req_list : a.batch;
  int64_t tiles = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t b = subset ? a.req_list[i] : i;
    tiles += (a.qo_indptr[b + 1] - a.qo_indptr[b] + 31) / 32;
  }
  return tiles * a.hkv >= 8 * nthreads_of(a) ? 32 : 16;
}

struct AlignedFloats {
  float* p = nullptr;
  explicit AlignedFloats(size_t n) {
    p = (float*)std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64);
    std::memset(p, 0, n * sizeof(float));
  }
  AlignedFloats(AlignedFloats&& o) noexcept : p(o.p) { o.p = nullptr; }
  AlignedFloats(const AlignedFloats&) = delete;
  ~AlignedFloats() { std::free(p); }
};

struct XWs {
  AlignedFloats qT, sT, kt, vt, acc, m, l, alpha;
};

// Prefetches the K and V rows of head hk of up to X_BN slots idx[0 .. n).
template <typename T>
inline void x_prefetch_rows(const Args& a, const T* kb, const T* vb, int64_t hk, int64_t d,
                            const int64_t* idx, int64_t n) {
  if (n > X_BN) n = X_BN;
  for (int64_t t = 0; t < n; ++t) {
    const char* kp = (const char*)(kb + idx[t] * a.k_ss + hk * a.k_sh);
    const char* vp = (const char*)(vb + idx[t] * a.v_ss + hk * a.v_sh);
    for (int64_t off = 0; off < d * (int64_t)sizeof(T); off += 64) {
      _mm_prefetch(kp + off, _MM_HINT_T0);
      _mm_prefetch(vp + off, _MM_HINT_T0);
    }
  }
}

#endif  // __AVX2__

#ifdef __AVX512F__
// ---- extend, 16 wide ------------------------------------------------------------------------
// Same tasks as the 8-wide extend, but with no horizontal reductions anywhere:
//  * the tile's queries are transposed once into qT [D][R] (R rows: r = gi * BM + qi, head
//    major, so one vector holds 16 consecutive queries of one head), and each K block is
//    gathered row-major into kt [BN][D]. Scores come out transposed, sT [t][r], from an
//    outer-product micro-kernel: MT tokens x NVP row vectors of accumulators, per j one
//    broadcast of kt[t][j] times the loaded qT[j][16 rows];
//  * the online softmax runs down the token axis, 16 rows per vector (max, exp2, sum are
//    element-wise; the causal mask is a lane mask);
//  * acc [R][D] += P @ V with MR rows x NC column vectors of accumulators: per token one load
//    of V's columns and MR broadcasts of p (read from sT), the running rescale folded into
//    loading the accumulators.
// The KV walk stops at the tile's last query, so the causal triangle costs only its diagonal
// 16 x 16 corners.

constexpr int x_mt(int nvp) { return nvp >= 4 ? 6 : nvp == 3 ? 8 : nvp == 2 ? 12 : 16; }

// s[u * R + 16 v + i] = sum_j qT[j * R + 16 v + i] * kt[u * D + j] for u < MT, v < NVP.
template <int NVP, int MT, int DC>
inline void x_qk(const float* qT, int64_t R, const float* kt, int64_t d_rt, float* s) {
  const int64_t D = DC ? DC : d_rt;
  __m512 acc[MT][NVP];
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < NVP; ++v) acc[u][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < D; ++j) {
    __m512 qv[NVP];
    for (int v = 0; v < NVP; ++v) qv[v] = _mm512_loadu_ps(qT + j * R + v * L);
    for (int u = 0; u < MT; ++u) {
      const __m512 kb = _mm512_set1_ps(kt[u * D + j]);
      for (int v = 0; v < NVP; ++v) acc[u][v] = _mm512_fmadd_ps(qv[v], kb, acc[u][v]);
    }
  }
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < NVP; ++v) _mm512_storeu_ps(s + u * R + v * L, acc[u][v]);
}

template <int NVP, int DC>
inline void x_qk_block(const float* qT, int64_t R, const float* kt, int64_t d, int n, float* s) {
  constexpr int MT = x_mt(NVP);
  // The last group may run past n into the block's spare rows (finite values, results unused).
  for (int t = 0; t < n; t += MT) x_qk<NVP, MT, DC>(qT, R, kt + t * d, d, s + t * R);
}

// o[i][c + 16 k] = o[i][...] * alpha[i] + sum_t s[t * R + i] * vt[t * D + c + 16 k], i < MR,
// k < NC (o, s, alpha offset to the first row, vt to the first column).
template <int MR, int NC>
inline void x_pv(float* o, int64_t D, const float* s, int64_t R, const float* vt, int n,
                 const float* alpha) {
  __m512 acc[MR][NC];
  for (int i = 0; i < MR; ++i) {
    const __m512 al = _mm512_set1_ps(alpha[i]);
    for (int k = 0; k < NC; ++k)
      acc[i][k] = _mm512_mul_ps(_mm512_loadu_ps(o + i * D + k * L), al);
  }
  for (int t = 0; t < n; ++t) {
    __m512 vv[NC];
    for (int k = 0; k < NC; ++k) vv[k] = _mm512_loadu_ps(vt + t * D + k * L);
    for (int i = 0; i < MR; ++i) {
      const __m512 p = _mm512_set1_ps(s[t * R + i]);
      for (int k = 0; k < NC; ++k) acc[i][k] = _mm512_fmadd_ps(p, vv[k], acc[i][k]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int k = 0; k < NC; ++k) _mm512_storeu_ps(o + i * D + k * L, acc[i][k]);
}

template <int MR>
inline void x_pv_cols(float* o, int64_t D, const float* s, int64_t R, const float* vt, int n,
                      const float* alpha) {
  int64_t c = 0;
  for (; c + 4 * L <= D; c += 4 * L) x_pv<MR, 4>(o + c, D, s, R, vt + c, n, alpha);
  switch ((D - c) / L) {
    case 3: x_pv<MR, 3>(o + c, D, s, R, vt + c, n, alpha); break;
    case 2: x_pv<MR, 2>(o + c, D, s, R, vt + c, n, alpha); break;
    case 1: x_pv<MR, 1>(o + c, D, s, R, vt + c, n, alpha); break;
    default: break;
  }
}

// Rows r0 .. r1 of acc, 6 at a time.
inline void x_pv_rows(float* acc, int64_t D, const float* sT, int64_t R, const float* vt, int n,
                      const float* alpha, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 6 <= r1; r += 6) x_pv_cols<6>(acc + r * D, D, sT + r, R, vt, n, alpha + r);
  float* o = acc + r * D;
  switch (r1 - r) {
    case 5: x_pv_cols<5>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 4: x_pv_cols<4>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 3: x_pv_cols<3>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 2: x_pv_cols<2>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 1: x_pv_cols<1>(o, D, sT + r, R, vt, n, alpha + r); break;
    default: break;
  }
}

template <typename T, int DC>
void x_extend_tile(const Args& a, int64_t bm, int64_t b, int64_t qt0, int64_t qt1, int64_t hk,
                   XWs& w) {
  const int64_t g = a.hq / a.hkv, d = DC ? DC : a.d, R = bm * g, NV = R / L;
  const int64_t q_beg = a.qo_indptr[b], n_new = a.qo_indptr[b + 1] - q_beg;
  const int64_t kv0 = a.kv_indptr[b], kv_len = a.kv_indptr[b + 1] - kv0;
  const int64_t p0 = kv_len - n_new + qt0;  // position of the tile's first query
  const int64_t nq = qt1 - qt0, kv_end = p0 + nq;  // the last query sees positions < kv_end
  const float scale = (float)(a.sm_scale * 1.4426950408889634);
  float *qT = w.qT.p, *sT = w.sT.p, *kt = w.kt.p, *vt = w.vt.p, *acc = w.acc.p;
  float *m = w.m.p, *l = w.l.p, *alpha = w.alpha.p;
  const T* kb = (const T*)a.k;
  const T* vb = (const T*)a.v;
  const T* qb = (const T*)a.q;
  x_prefetch_rows(a, kb, vb, hk, d, a.kv_indices + kv0, kv_end);  // the first block
  if (nq < bm) std::memset(qT, 0, sizeof(float) * d * R);  // rows past the tile score 0
  alignas(64) float row[L];
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t qi = 0; qi < nq; ++qi) {
      const T* src = qb + (q_beg + qt0 + qi) * a.q_sn + (hk * g + gi) * a.q_sh;
      const int64_t r = gi * bm + qi;
      for (int64_t j = 0; j < d; j += L) {
        _mm512_store_ps(row, _mm512_mul_ps(ld16(src + j), _mm512_set1_ps(scale)));
        for (int i = 0; i < L; ++i) qT[(j + i) * R + r] = row[i];
      }
    }
  for (int64_t r = 0; r < R; ++r) { m[r] = -__builtin_inff(); l[r] = 0.f; }
  std::memset(acc, 0, sizeof(float) * R * d);
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  for (int64_t j0 = 0; j0 < kv_end; j0 += X_BN) {
    const int n = (int)(kv_end - j0 < X_BN ? kv_end - j0 : X_BN);
    const int64_t* idx = a.kv_indices + kv0 + j0;
    // Pull the next block's scattered K/V rows toward the cache while this one computes.
    x_prefetch_rows(a, kb, vb, hk, d, idx + X_BN, kv_end - j0 - X_BN);
    for (int t = 0; t < n; ++t) {
      const T* kp = kb + idx[t] * a.k_ss + hk * a.k_sh;
      const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
      for (int64_t j = 0; j < d; j += L) {
        _mm512_store_ps(kt + t * d + j, ld16(kp + j));
        _mm512_store_ps(vt + t * d + j, ld16(vp + j));
      }
    }
    // Scores sT[t][r], vector groups of 3 or 4 (fewer at the end).
    for (int64_t v = 0; v < NV;) {
      const int64_t rem = NV - v;
      const int take = (int)(rem <= 4 ? rem : rem <= 6 ? 3 : 4);
      const float* q = qT + v * L;
      float* s = sT + v * L;
      switch (take) {
        case 4: x_qk_block<4, DC>(q, R, kt, d, n, s); break;
        case 3: x_qk_block<3, DC>(q, R, kt, d, n, s); break;
        case 2: x_qk_block<2, DC>(q, R, kt, d, n, s); break;
        default: x_qk_block<1, DC>(q, R, kt, d, n, s); break;
      }
      v += take;
    }
    // Causal mask and online softmax, 16 rows per vector.
    for (int64_t v = 0; v < NV; ++v) {
      float* s = sT + v * L;
      const int64_t pos0 = p0 + (v * L) % bm;  // the position of the vector's first lane
      // Token t hides lanes i < j0 + t - pos0 (whose query comes before it).
      for (int64_t t = pos0 - j0 + 1 > 0 ? pos0 - j0 + 1 : 0; t < n; ++t) {
        const int64_t k = j0 + t - pos0;
        const __mmask16 hide = k >= L ? (__mmask16)0xffff : (__mmask16)((1u << k) - 1);
        _mm512_storeu_ps(s + t * R, _mm512_mask_mov_ps(_mm512_loadu_ps(s + t * R), hide, ninf));
      }
      __m512 mx = _mm512_loadu_ps(s);
      for (int t = 1; t < n; ++t) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + t * R));
      const __m512 m_old = _mm512_loadu_ps(m + v * L);
      const __m512 m_new = _mm512_max_ps(m_old, mx);  // finite: token 0 is seen by every row
      _mm512_storeu_ps(alpha + v * L, exp2x(_mm512_sub_ps(m_old, m_new)));
      _mm512_storeu_ps(m + v * L, m_new);
      __m512 ls = _mm512_setzero_ps();
      for (int t = 0; t < n; ++t) {
        const __m512 p = exp2x(_mm512_sub_ps(_mm512_loadu_ps(s + t * R), m_new));
        _mm512_storeu_ps(s + t * R, p);
        ls = _mm512_add_ps(ls, p);
      }
      _mm512_storeu_ps(l + v * L, _mm512_fmadd_ps(_mm512_loadu_ps(l + v * L),
                                                  _mm512_loadu_ps(alpha + v * L), ls));
    }
    // acc = acc * alpha + P @ V on the tile's real rows.
    if (nq == bm) {
      x_pv_rows(acc, d, sT, R, vt, n, alpha, 0, R);
    } else {
      for (int64_t gi = 0; gi < g; ++gi)
        x_pv_rows(acc, d, sT, R, vt, n, alpha, gi * bm, gi * bm + nq);
    }
  }
  T* ob = (T*)a.o;
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t r = gi * bm + qi;
      const __m512 inv = _mm512_set1_ps(1.f / l[r]);
      T* dst = ob + (q_beg + qt0 + qi) * a.o_sn + (hk * g + gi) * a.o_sh;
      for (int64_t j = 0; j < d; j += L) st16(dst + j, _mm512_mul_ps(ld16(acc + r * d + j), inv));
    }
}

template <typename T, int DC>
int64_t x_extend_impl(const Args& a) {
  const int64_t g = a.hq / a.hkv, d = a.d, bm = x_bm(a, g), R = bm * g;
  auto init = [&] {
    return XWs{AlignedFloats((size_t)(d * R)), AlignedFloats((size_t)((X_BN + X_PAD) * R)),
               AlignedFloats((size_t)((X_BN + X_PAD) * d)), AlignedFloats((size_t)(X_BN * d)),
               AlignedFloats((size_t)(R * d)), AlignedFloats((size_t)R),
               AlignedFloats((size_t)R), AlignedFloats((size_t)R)};
  };
  for_each_tile(a, bm, X_BN, init, [&](XWs& w, int64_t b, int64_t qt0, int64_t qt1, int64_t hk) {
    x_extend_tile<T, DC>(a, bm, b, qt0, qt1, hk, w);
  });
  return OK;
}
#endif  // __AVX512F__

#if defined(__AVX2__) && defined(__FMA__)
#define RKV_Y_EXTEND 1
// ---- extend, 8 wide without reductions (AVX2 + FMA) ----------------------------------------
// The 16-wide kernel's scheme (see above) on 8-float vectors, for AVX2 CPUs and for AVX-512
// ones with RADIXKV_CPU_AVX512=0: queries transposed once per tile into qT [D][R], scores as
// outer products into sT [t][r], the online softmax down the token axis 8 rows per vector, and
// acc += P @ V from broadcasts of sT. The dot-product extend above (a horizontal reduction per
// 2 x 4 scores) stays for quantized KV. Register budgets (16 ymm): scores 6 tokens x 2 row
// vectors (12 accumulators, 2 q loads, 1 broadcast), P @ V 6 rows x 2 column vectors.
// 2-core Zen 3, 2 threads, 9 query / 3 KV heads, D = 64, 512 new tokens over 600 cached, 30
// layers (bench/attention.py --batch 1 --context 1112 --extend-prefix 600 --extend-layers 30):
// 284 ms (107 GFLOP/s) against 506 for the dot-product kernel and 420-470 for contiguous SDPA;
// the engine's 512-token prefill spent 155-170 ms in attention before, 115-127 after.
constexpr int y_mt(int nvp) { return nvp >= 2 ? 6 : 12; }

// RADIXKV_CPU_EXTEND_DOT=1 in the environment selects the dot-product extend instead (tests
// compare the two).
bool y_extend_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("RADIXKV_CPU_EXTEND_DOT");
    return !(e && e[0] == '1');
  }();
  return on;
}

// s[u * R + 8 v + i] = sum_j qT[j * R + 8 v + i] * kt[u * D + j] for u < MT, v < NVP.
template <int NVP, int MT, int DC>
inline void y_qk(const float* qT, int64_t R, const float* kt, int64_t d_rt, float* s) {
  const int64_t D = DC ? DC : d_rt;
  __m256 acc[MT][NVP];
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < NVP; ++v) acc[u][v] = _mm256_setzero_ps();
  for (int64_t j = 0; j < D; ++j) {
    __m256 qv[NVP];
    for (int v = 0; v < NVP; ++v) qv[v] = _mm256_loadu_ps(qT + j * R + v * W);
    for (int u = 0; u < MT; ++u) {
      const __m256 kb = _mm256_broadcast_ss(kt + u * D + j);
      for (int v = 0; v < NVP; ++v) acc[u][v] = _mm256_fmadd_ps(qv[v], kb, acc[u][v]);
    }
  }
  for (int u = 0; u < MT; ++u)
    for (int v = 0; v < NVP; ++v) _mm256_storeu_ps(s + u * R + v * W, acc[u][v]);
}

template <int NVP, int DC>
inline void y_qk_block(const float* qT, int64_t R, const float* kt, int64_t d, int n, float* s) {
  constexpr int MT = y_mt(NVP);
  // The last group may run past n into the block's spare rows (finite values, results unused).
  for (int t = 0; t < n; t += MT) y_qk<NVP, MT, DC>(qT, R, kt + t * d, d, s + t * R);
}

// o[i][c + 8 k] = o[i][...] * alpha[i] + sum_t s[t * R + i] * vt[t * D + c + 8 k], i < MR,
// k < NC (o, s, alpha offset to the first row, vt to the first column).
template <int MR, int NC>
inline void y_pv(float* o, int64_t D, const float* s, int64_t R, const float* vt, int n,
                 const float* alpha) {
  __m256 acc[MR][NC];
  for (int i = 0; i < MR; ++i) {
    const __m256 al = _mm256_broadcast_ss(alpha + i);
    for (int k = 0; k < NC; ++k)
      acc[i][k] = _mm256_mul_ps(_mm256_loadu_ps(o + i * D + k * W), al);
  }
  for (int t = 0; t < n; ++t) {
    __m256 vv[NC];
    for (int k = 0; k < NC; ++k) vv[k] = _mm256_loadu_ps(vt + t * D + k * W);
    for (int i = 0; i < MR; ++i) {
      const __m256 p = _mm256_broadcast_ss(s + t * R + i);
      for (int k = 0; k < NC; ++k) acc[i][k] = _mm256_fmadd_ps(p, vv[k], acc[i][k]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int k = 0; k < NC; ++k) _mm256_storeu_ps(o + i * D + k * W, acc[i][k]);
}

template <int MR>
inline void y_pv_cols(float* o, int64_t D, const float* s, int64_t R, const float* vt, int n,
                      const float* alpha) {
  int64_t c = 0;
  for (; c + 2 * W <= D; c += 2 * W) y_pv<MR, 2>(o + c, D, s, R, vt + c, n, alpha);
  if (c < D) y_pv<MR, 1>(o + c, D, s, R, vt + c, n, alpha);
}

// Rows r0 .. r1 of acc, 6 at a time.
inline void y_pv_rows(float* acc, int64_t D, const float* sT, int64_t R, const float* vt, int n,
                      const float* alpha, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 6 <= r1; r += 6) y_pv_cols<6>(acc + r * D, D, sT + r, R, vt, n, alpha + r);
  float* o = acc + r * D;
  switch (r1 - r) {
    case 5: y_pv_cols<5>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 4: y_pv_cols<4>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 3: y_pv_cols<3>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 2: y_pv_cols<2>(o, D, sT + r, R, vt, n, alpha + r); break;
    case 1: y_pv_cols<1>(o, D, sT + r, R, vt, n, alpha + r); break;
    default: break;
  }
}

template <typename T, int DC>
void y_extend_tile(const Args& a, int64_t bm, int64_t b, int64_t qt0, int64_t qt1, int64_t hk,
                   XWs& w) {
  const int64_t g = a.hq / a.hkv, d = DC ? DC : a.d, R = bm * g, NV = R / W;
  const int64_t q_beg = a.qo_indptr[b], n_new = a.qo_indptr[b + 1] - q_beg;
  const int64_t kv0 = a.kv_indptr[b], kv_len = a.kv_indptr[b + 1] - kv0;
  const int64_t p0 = kv_len - n_new + qt0;  // position of the tile's first query
  const int64_t nq = qt1 - qt0, kv_end = p0 + nq;  // the last query sees positions < kv_end
  const float scale = (float)(a.sm_scale * 1.4426950408889634);
  float *qT = w.qT.p, *sT = w.sT.p, *kt = w.kt.p, *vt = w.vt.p, *acc = w.acc.p;
  float *m = w.m.p, *l = w.l.p, *alpha = w.alpha.p;
  const T* kb = (const T*)a.k;
  const T* vb = (const T*)a.v;
  const T* qb = (const T*)a.q;
  x_prefetch_rows(a, kb, vb, hk, d, a.kv_indices + kv0, kv_end);  // the first block
  if (nq < bm) std::memset(qT, 0, sizeof(float) * d * R);  // rows past the tile score 0
  alignas(32) float row[W];
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t qi = 0; qi < nq; ++qi) {
      const T* src = qb + (q_beg + qt0 + qi) * a.q_sn + (hk * g + gi) * a.q_sh;
      const int64_t r = gi * bm + qi;
      for (int64_t j = 0; j < d; j += W) {
        store(row, load(src + j) * splat(scale));
        for (int i = 0; i < W; ++i) qT[(j + i) * R + r] = row[i];
      }
    }
  for (int64_t r = 0; r < R; ++r) { m[r] = -__builtin_inff(); l[r] = 0.f; }
  std::memset(acc, 0, sizeof(float) * R * d);
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j0 = 0; j0 < kv_end; j0 += X_BN) {
    const int n = (int)(kv_end - j0 < X_BN ? kv_end - j0 : X_BN);
    const int64_t* idx = a.kv_indices + kv0 + j0;
    // Pull the next block's scattered K/V rows toward the cache while this one computes.
    x_prefetch_rows(a, kb, vb, hk, d, idx + X_BN, kv_end - j0 - X_BN);
    for (int t = 0; t < n; ++t) {
      const T* kp = kb + idx[t] * a.k_ss + hk * a.k_sh;
      const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
      for (int64_t j = 0; j < d; j += W) {
        store(kt + t * d + j, load(kp + j));
        store(vt + t * d + j, load(vp + j));
      }
    }
    // Scores sT[t][r], two row vectors at a time (one at the end).
    for (int64_t v = 0; v < NV; v += 2) {
      if (NV - v >= 2)
        y_qk_block<2, DC>(qT + v * W, R, kt, d, n, sT + v * W);
      else
        y_qk_block<1, DC>(qT + v * W, R, kt, d, n, sT + v * W);
    }
    // Causal mask and online softmax, 8 rows per vector.
    for (int64_t v = 0; v < NV; ++v) {
      float* s = sT + v * W;
      const int64_t pos0 = p0 + (v * W) % bm;  // the position of the vector's first lane
      // Token t hides lanes i < j0 + t - pos0 (whose query comes before it).
      for (int64_t t = pos0 - j0 + 1 > 0 ? pos0 - j0 + 1 : 0; t < n; ++t) {
        const int64_t k = j0 + t - pos0;
        if (k >= W) {
          _mm256_storeu_ps(s + t * R, ninf);
        } else {
          const __m256 hide = _mm256_cmp_ps(lane, _mm256_set1_ps((float)k), _CMP_LT_OQ);
          _mm256_storeu_ps(s + t * R, _mm256_blendv_ps(_mm256_loadu_ps(s + t * R), ninf, hide));
        }
      }
      __m256 mx = _mm256_loadu_ps(s);
      for (int t = 1; t < n; ++t) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + t * R));
      const __m256 m_old = _mm256_loadu_ps(m + v * W);
      const __m256 m_new = _mm256_max_ps(m_old, mx);  // finite: token 0 is seen by every row
      _mm256_storeu_ps(alpha + v * W, exp2v(_mm256_sub_ps(m_old, m_new)));
      _mm256_storeu_ps(m + v * W, m_new);
      __m256 ls = _mm256_setzero_ps();
      for (int t = 0; t < n; ++t) {
        const __m256 p = exp2v(_mm256_sub_ps(_mm256_loadu_ps(s + t * R), m_new));
        _mm256_storeu_ps(s + t * R, p);
        ls = _mm256_add_ps(ls, p);
      }
      _mm256_storeu_ps(l + v * W, _mm256_fmadd_ps(_mm256_loadu_ps(l + v * W),
                                                  _mm256_loadu_ps(alpha + v * W), ls));
    }
    // acc = acc * alpha + P @ V on the tile's real rows.
    if (nq == bm) {
      y_pv_rows(acc, d, sT, R, vt, n, alpha, 0, R);
    } else {
      for (int64_t gi = 0; gi < g; ++gi)
        y_pv_rows(acc, d, sT, R, vt, n, alpha, gi * bm, gi * bm + nq);
    }
  }
  T* ob = (T*)a.o;
  for (int64_t gi = 0; gi < g; ++gi)
    for (int64_t qi = 0; qi < nq; ++qi) {
      const int64_t r = gi * bm + qi;
      const vf inv = splat(1.f / l[r]);
      T* dst = ob + (q_beg + qt0 + qi) * a.o_sn + (hk * g + gi) * a.o_sh;
      for (int64_t j = 0; j < d; j += W) store(dst + j, load(acc + r * d + j) * inv);
    }
}

template <typename T, int DC>
int64_t y_extend_impl(const Args& a) {
  const int64_t g = a.hq / a.hkv, d = a.d, bm = x_bm(a, g), R = bm * g;
  auto init = [&] {
    return XWs{AlignedFloats((size_t)(d * R)), AlignedFloats((size_t)((X_BN + X_PAD) * R)),
               AlignedFloats((size_t)((X_BN + X_PAD) * d)), AlignedFloats((size_t)(X_BN * d)),
               AlignedFloats((size_t)(R * d)), AlignedFloats((size_t)R),
               AlignedFloats((size_t)R), AlignedFloats((size_t)R)};
  };
  for_each_tile(a, bm, X_BN, init, [&](XWs& w, int64_t b, int64_t qt0, int64_t qt1, int64_t hk) {
    y_extend_tile<T, DC>(a, bm, b, qt0, qt1, hk, w);
  });
  return OK;
}
#endif  // __AVX2__

template <typename T, typename KT, int DV>
int64_t extend_impl(const Args& a) {
#ifdef __AVX512F__
  if (std::is_same<T, KT>::value && a.d % L == 0 && avx512_enabled())
    return x_extend_impl<T, DV * W>(a);
#endif
#ifdef RKV_Y_EXTEND
  if (std::is_same<T, KT>::value && a.d % W == 0 && y_extend_enabled())
    return y_extend_impl<T, DV * W>(a);
#endif
  return extend_impl8<T, KT, DV>(a);
}

template <int64_t (*F8)(const Args&), int64_t (*F16)(const Args&), int64_t (*F0)(const Args&)>
int64_t by_dim(const Args& a) {
  if (a.d == 8 * W) return F8(a);
  if (a.d == 16 * W) return F16(a);
  return F0(a);
}

template <typename T, typename KT = T>
int64_t decode_t(const Args& a) {
  return by_dim<decode_impl<T, KT, 8>, decode_impl<T, KT, 16>, decode_impl<T, KT, 0>>(a);
}
template <typename T, typename KT = T>
int64_t extend_t(const Args& a) {
  return by_dim<extend_impl<T, KT, 8>, extend_impl<T, KT, 16>, extend_impl<T, KT, 0>>(a);
}

// Dtype codes: q / o dtype in the low 4 bits, KV storage dtype in the next 4 (0: same as q).
// Quantized KV runs with float32 q / o only (cpu_kernels.py widens half q once per call).
template <int64_t (*F32F)(const Args&), int64_t (*BF16F)(const Args&),
          int64_t (*F16F)(const Args&), int64_t (*I8F)(const Args&), int64_t (*F8F)(const Args&)>
int64_t by_dtype(int64_t code, const Args& a) {
  const int64_t qd = code & 15, kd = code >> 4;
  if (kd == 0 || kd == qd) {
    switch (qd) {
      case F32: return F32F(a);
      case BF16: return BF16F(a);
      case F16: return F16F(a);
      default: return BAD_DTYPE;
    }
  }
  if (qd != F32 || a.k_scale == nullptr || a.v_scale == nullptr) return BAD_DTYPE;
  if (kd == I8) return I8F(a);
  if (kd == F8E4M3) return F8F(a);
  return BAD_DTYPE;
}

// ---- quantize-and-store (set_kv of a quantized pool) ----------------------------------------
struct QArgs {
  int64_t n, h, d, rows;
  const float* src; int64_t src_sn, src_sh;  // [n, H, D], last dim contiguous
  void* dst; int64_t dst_ss, dst_sh;         // [rows, H, D] int8 / fp8 codes
  float* scale; int64_t sc_ss, sc_sh;        // [rows, H]
  const int64_t* slots;                      // [n]
  int64_t dtype;                             // I8 or F8E4M3
  int64_t nthreads;
};  // packed by cpu_kernels.py with struct.pack("<16q")
static_assert(sizeof(QArgs) == 16 * 8, "QArgs must stay 16 packed 8-byte fields");

inline vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
// Round half to even for |x| < 2^22: adding 1.5 * 2^23 rounds in the default FP mode.
inline vf vround(vf x) {
  const vf magic = splat(12582912.0f);
  return (x + magic) - magic;
}

// The low byte of each of 8 lanes to p[0..8) (the lanes hold -127..127 or codes 0..255).
inline void narrow_store(uint8_t* p, vu x) {
#ifdef __AVX2__
  const __m256i m = (__m256i)(x & 0xffu);
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  _mm_storel_epi64((__m128i*)p, _mm_packus_epi16(w, w));
#else
  const vu8 c = __builtin_convertvector(x, vu8);
  std::memcpy(p, &c, sizeof c);
#endif
}

// One row x [D] -> codes + scale, the formulas of kv_quant.quantize (bit-identical to torch:
// the same float32 division, round-half-even and RNE fp8 rounding).
template <typename KT>
void quant_row(const float* x, int64_t d, KT* q, float* scale) {
  constexpr bool I8 = std::is_same<KT, int8_t>::value;
  const float qmax = I8 ? 127.f : 448.f;
  vf am = splat(0.f);
  for (int64_t j = 0; j < d; j += W) am = vmax(am, vabs(load(x + j)));
  float s = hmax(am) / qmax;
  if (!(s > 0.f)) s = 1.f;
  *scale = s;
  const vf sv = splat(s), hi = splat(qmax), lo = splat(-qmax);
  for (int64_t j = 0; j < d; j += W) {
    vf y = vmin(vmax(load(x + j) / sv, lo), hi);
    if (I8) {
      narrow_store((uint8_t*)(q + j), (vu)__builtin_convertvector(vround(y), vi));
    } else {
      const vf ay = vabs(y);
      const vu bits = (vu)ay;
      // Normal codes: keep 3 mantissa bits with round-to-nearest-even, rebias 127 -> 7.
      const vu rn = ((bits + 0x7ffffu + ((bits >> 20) & 1u)) >> 20) - (120u << 3);
      // Subnormal codes (|y| < 2^-6): multiples of 2^-9, rounded half to even.
      const vu sub = (vu)__builtin_convertvector(vround(ay * splat(512.f)), vi);
      const vu code = (vu)(ay < splat(0x1p-6f) ? sub : rn) | (((vu)y >> 24) & 0x80u);
      narrow_store((uint8_t*)(q + j), code);
    }
  }
}

template <typename KT>
int64_t quant_store(const QArgs& a) {
  for (int64_t i = 0; i < a.n; ++i)
    if ((uint64_t)a.slots[i] >= (uint64_t)a.rows) return BAD_SLOT;
  const int64_t total = a.n * a.h;
  const int nt = a.nthreads > 0 ? (int)a.nthreads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1 && total * a.d >= PAR_MIN_WORK)
  for (int64_t r = 0; r < total; ++r) {
    const int64_t i = r / a.h, hh = r % a.h, slot = a.slots[i];
    quant_row<KT>(a.src + i * a.src_sn + hh * a.src_sh, a.d,
                  (KT*)a.dst + slot * a.dst_ss + hh * a.dst_sh,
                  a.scale + slot * a.sc_ss + hh * a.sc_sh);
  }
  return OK;
}

}  // namespace

extern "C" {

// Returns the vector width in floats the kernels assume: head_dim must be a multiple of it.
int64_t rkv_vector_width() { return W; }

// 1 when the 16-wide AVX-512 kernels are built and enabled (head_dim % 16 == 0, float K/V).
int64_t rkv_wide_kernels() {
#ifdef __AVX512F__
  return avx512_enabled() ? 1 : 0;
#else
  return 0;
#endif
}

// 1 when float K/V extends run on an outer-product kernel (16-wide, or 8-wide on AVX2 + FMA
// unless RADIXKV_CPU_EXTEND_DOT=1; head_dim % 8 == 0), 0 when on the dot-product one.
int64_t rkv_outer_extend() {
#ifdef __AVX512F__
  if (avx512_enabled()) return 1;
#endif
#ifdef RKV_Y_EXTEND
  return y_extend_enabled() ? 1 : 0;
#else
  return 0;
#endif
}

int64_t rkv_decode(int64_t dtype, const Args* a) {
  const int64_t st = check_csr(*a);
  if (st != OK) return st;
  return by_dtype<decode_t<float>, decode_t<bf16>, decode_t<_Float16>,
                  decode_t<float, int8_t>, decode_t<float, f8e4m3>>(dtype, *a);
}

int64_t rkv_extend(int64_t dtype, const Args* a) {
  const int64_t st = check_csr(*a);
  if (st != OK) return st;
  const int64_t* qp = a->qo_indptr;
  if (qp[0] != 0 || qp[a->batch] != a->n_q) return BAD_QO_INDPTR;
  for (int64_t b = 0; b < a->batch; ++b) {
    if (qp[b + 1] < qp[b]) return BAD_QO_INDPTR;
    if (qp[b + 1] - qp[b] > a->kv_indptr[b + 1] - a->kv_indptr[b]) return BAD_EXTEND_LEN;
  }
  for (int64_t i = 0; i < a->n_req_list; ++i)
    if (a->req_list[i] < 0 || a->req_list[i] >= a->batch) return BAD_REQ_LIST;
  return by_dtype<extend_t<float>, extend_t<bf16>, extend_t<_Float16>,
                  extend_t<float, int8_t>, extend_t<float, f8e4m3>>(dtype, *a);
}

// Quantizes rows src [n, H, D] (float32) into the slots' codes and scales; BAD_SLOT (nothing
// written) when a slot is outside [0, rows).
int64_t rkv_quant_store(const QArgs* a) {
  if (a->d % W) return BAD_DTYPE;
  if (a->dtype == I8) return quant_store<int8_t>(*a);
  if (a->dtype == F8E4M3) return quant_store<f8e4m3>(*a);
  return BAD_DTYPE;
}

}  // extern "C"
