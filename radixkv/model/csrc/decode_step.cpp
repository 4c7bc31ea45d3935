// A whole decode step of a Llama-family decoder for 1-4 rows (one new token of each of up to
// four requests), for the CPU, in one call: every layer's RMSNorm, products, rotary embedding,
// K/V store, paged attention, residual adds and SwiGLU, then the final norm and the LM head.
//
// Why: at batch 1 a step is ~121 matrix-vector products and ~300 small ops. Through Python
// each op costs microseconds of dispatch, and oneDNN's prepacked linear ~12 us of fixed cost a
// call even on a 16 x 576 weight: together 3-4 ms of a 15-18 ms float32 step that should be
// bound by reading the weights once. Here a product streams its weight from oneDNN's own
// prepacked buffer (no second copy of the weights) and the rest is a few microseconds a layer.
//
// Weight layouts (oneDNN's blocked formats for inner products, the same 64-output blocks on
// AVX-512 and, for float32, on AVX2 (checked on an AVX2-only EPYC as well), which
// radixkv/model/decode_kernels.py verifies byte for byte against the dense weight at load,
// disabling this path if they differ): a weight [O, K] (O, K multiples of 64) is a grid of
// 64 x 64 tiles, output block ob major, then input block kb, each tile contiguous:
//   float32:  tile[k % 64][o % 64]                       (4096 floats)
//   bfloat16: tile[(k % 64) / 2][o % 64][k % 2]          (VNNI pairs, for vdpbf16ps)
// so a product reads each tile once, streaming, 64 outputs in four 16-float accumulators
// (AVX2: in chunks of 8-float accumulators, see tiles_f32).
//
// Rounding mirrors the layered path (radixkv/model/layers.py, rms_norm.cpp, rope.cpp): every
// op's result is rounded to the model dtype where torch would round it; sums run in float32.
// Built with -ffp-contract=off so scalar code is not fused into FMAs behind our back (the
// products use explicit FMA / dot-product instructions).
//
// Group-quantized weights (LLM(quantization=...)) run on the packed low-bit kernel of
// radixkv/model/csrc/qgemv.cpp (rkv_qgemm, passed in as a function pointer) instead, and
// dense (unpacked) weights, which is what bfloat16 models keep on CPUs without native bf16
// GEMMs, on the row kernel below (`dense_product`): it widens bf16 in registers, so such a
// step reads half the bytes of a float32 one.
//
// Attention runs on the fused CPU decode kernel of radixkv/attention (rkv_decode, passed in
// as a function pointer with its `struct Args`), outside this file's parallel regions so it
// gets the OpenMP threads itself; SwiGLU on radixkv/model/csrc/swiglu.cpp's kernel likewise.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#define RKV_STEP 1
#define RKV_WIDE 1  // float32 products on 16-float vectors
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RKV_STEP 1
#define RKV_WIDE 0  // float32 products on 8-float vectors (16 registers: see tiles_f32)
#else
#define RKV_STEP 0
#endif

namespace {

enum DType : int64_t { F32 = 0, BF16 = 1 };
enum Status : int64_t { OK = 0, BAD_DTYPE = 1, BAD_SLOT = 2, BAD_INDPTR = 3, BAD_SHAPE = 4,
                        NO_KERNEL = 5 };

enum Kind : int64_t { TILES = 0, QGEMM = 1, DENSE = 2 };

struct Lin {
  const void* w;     // TILES: packed tiles (see the header); DENSE: [O, K] row-major
  const void* bias;  // [O] (TILES, DENSE: model dtype; QGEMM: float32), or null
  int64_t O, K;
  int64_t kind;      // TILES; QGEMM: a group-quantized weight run by rkv_qgemm (qgemv.cpp);
                     // DENSE: a model-dtype weight, row-major (K a multiple of 8)
  int64_t fmt;       // QGEMM: the packed format code (int4 0, int8 1)
  const void* qs;    // QGEMM: codes and scales as qgemv.cpp lays them out
  const void* scales;
};

// rkv_qgemm of radixkv/model/csrc/qgemv.cpp: y[M, N] = x[M, K] @ W^T (+ bias), float32 x / y.
typedef int64_t (*QGemm)(int64_t fmt, int64_t M, int64_t N, int64_t K, const float* x,
                         int64_t ldx, const void* qs, const void* sc, const float* bias,
                         float* y, int64_t ldy, int64_t nthreads);

struct Layer {
  Lin qkv, o, gate_up, down;
  const void* norm1;  // input_layernorm weight [H]
  const void* norm2;  // post_attention_layernorm weight [H]
  void* k_buf;        // [rows, Hkv, D] this layer's pool buffers
  void* v_buf;
};

struct Step {
  int64_t M, H, I, hq, hkv, d, n_layers, dtype;
  const Layer* layers;
  void* x;                 // [M, H] hidden rows (model dtype), updated in place
  const void* cos;         // [M, D/2] model dtype
  const void* sin;
  const int64_t* slots;    // [M] KV slot of each row's new token
  int64_t rows;            // slots of the pool buffers
  const int64_t* kv_indptr;   // [M + 1]
  const int64_t* kv_indices;  // [nnz]
  int64_t nnz;
  const void* final_norm;  // [H]
  Lin head;                // [vocab, H]
  float* logits;           // [M, vocab]
  double eps, sm_scale;
  int64_t nthreads;
  int64_t (*attn)(int64_t, const void*);  // rkv_decode of paged_attention.cpp
  QGemm qgemm;                            // rkv_qgemm, when a weight is QGEMM (else null)
  int64_t (*swiglu)(const void*);         // rkv_swiglu of swiglu.cpp
};

// `struct Args` of radixkv/attention/csrc/paged_attention.cpp (rkv_decode's input).
struct AttnArgs {
  int64_t n_q, batch, hq, hkv, d, rows, nnz;
  const void* q; int64_t q_sn, q_sh;
  const void* k; int64_t k_ss, k_sh;
  const void* v; int64_t v_ss, v_sh;
  void* o; int64_t o_sn, o_sh;
  const int64_t* kv_indptr;
  const int64_t* kv_indices;
  const int64_t* qo_indptr;
  const int64_t* req_list;
  int64_t n_req_list;
  double sm_scale;
  int64_t nthreads;
  const float* k_scale; int64_t ksc_ss, ksc_sh;
  const float* v_scale; int64_t vsc_ss, vsc_sh;
};
static_assert(sizeof(AttnArgs) == 32 * 8, "AttnArgs must match paged_attention.cpp's Args");

inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline uint16_t f2bf(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf2f(p[i]); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = f2bf(v); }
template <typename T> inline float rnd(float v);
template <> inline float rnd<float>(float v) { return v; }
template <> inline float rnd<uint16_t>(float v) { return bf2f(f2bf(v)); }

int nthreads_of(const Step& s) { return s.nthreads > 0 ? (int)s.nthreads : 1; }

#if RKV_STEP
// ---- products on the packed tiles ----------------------------------------------------------
// Work split: the tiles of a weight are numbered in memory order (ob major, kb minor) and each
// thread takes one contiguous range, so every thread streams its share of the bytes exactly
// once. Sums over a thread's tiles of an output block go to that thread's partial buffer
// part[t][M][O] (fp32); an output block split between threads is summed in the epilogue.

#if RKV_WIDE
template <int MR>
void tiles_f32(const Lin& L, const float* x /* [M, K] */, int64_t x_s, int64_t b0, int64_t b1,
               float* part /* [M, O] */) {
  const int64_t nkb = L.K / 64;
  const float* W = (const float*)L.w;
  int64_t b = b0;
  while (b < b1) {
    const int64_t ob = b / nkb;
    const int64_t bend = (ob + 1) * nkb < b1 ? (ob + 1) * nkb : b1;
    __m512 acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    for (; b < bend; ++b) {
      const float* t = W + b * 4096;
      const int64_t k0 = (b % nkb) * 64;
      for (int k = 0; k < 64; ++k) {
        const __m512 w0 = _mm512_loadu_ps(t + k * 64), w1 = _mm512_loadu_ps(t + k * 64 + 16);
        const __m512 w2 = _mm512_loadu_ps(t + k * 64 + 32), w3 = _mm512_loadu_ps(t + k * 64 + 48);
        for (int m = 0; m < MR; ++m) {
          const __m512 xv = _mm512_set1_ps(x[m * x_s + k0 + k]);
          acc[m][0] = _mm512_fmadd_ps(xv, w0, acc[m][0]);
          acc[m][1] = _mm512_fmadd_ps(xv, w1, acc[m][1]);
          acc[m][2] = _mm512_fmadd_ps(xv, w2, acc[m][2]);
          acc[m][3] = _mm512_fmadd_ps(xv, w3, acc[m][3]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(part + m * L.O + ob * 64 + u * 16, acc[m][u]);
  }
}
#else
// AVX2 has 16 vector registers, so a tile's 64 outputs are taken NV * 8 at a time (MR * NV
// accumulators, NV weight vectors, one broadcast: <= 14 registers): the tile's rows are then
// read in 8 / NV passes of NV * 32 contiguous bytes each, which the prefetcher streams as
// well as one pass (the tile, 16 KiB, stays in L1 between passes).
template <int MR, int NV>
void tiles_f32(const Lin& L, const float* x /* [M, K] */, int64_t x_s, int64_t b0, int64_t b1,
               float* part /* [M, O] */) {
  static_assert(MR * NV <= 8 && 8 % NV == 0, "register budget");
  const int64_t nkb = L.K / 64;
  const float* W = (const float*)L.w;
  int64_t b = b0;
  while (b < b1) {
    const int64_t ob = b / nkb;
    const int64_t bstart = b;
    const int64_t bend = (ob + 1) * nkb < b1 ? (ob + 1) * nkb : b1;
    for (int c = 0; c < 64; c += NV * 8) {  // output chunk [c, c + 8 NV) of the block
      __m256 acc[MR][NV];
      for (int m = 0; m < MR; ++m)
        for (int u = 0; u < NV; ++u) acc[m][u] = _mm256_setzero_ps();
      for (int64_t bb = bstart; bb < bend; ++bb) {
        const float* t = W + bb * 4096 + c;
        const float* xk = x + (bb % nkb) * 64;
        for (int k = 0; k < 64; ++k) {
          __m256 w[NV];
          for (int u = 0; u < NV; ++u) w[u] = _mm256_loadu_ps(t + k * 64 + u * 8);
          for (int m = 0; m < MR; ++m) {
            const __m256 xv = _mm256_broadcast_ss(xk + m * x_s + k);
            for (int u = 0; u < NV; ++u) acc[m][u] = _mm256_fmadd_ps(xv, w[u], acc[m][u]);
          }
        }
      }
      for (int m = 0; m < MR; ++m)
        for (int u = 0; u < NV; ++u)
          _mm256_storeu_ps(part + m * L.O + ob * 64 + c + u * 8, acc[m][u]);
    }
    b = bend;
  }
}
#endif

#if defined(__AVX512BF16__)
template <int MR>
void tiles_bf16(const Lin& L, const uint16_t* x, int64_t x_s, int64_t b0, int64_t b1,
                float* part) {
  const int64_t nkb = L.K / 64;
  const uint16_t* W = (const uint16_t*)L.w;
  int64_t b = b0;
  while (b < b1) {
    const int64_t ob = b / nkb;
    const int64_t bend = (ob + 1) * nkb < b1 ? (ob + 1) * nkb : b1;
    __m512 acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm512_setzero_ps();
    for (; b < bend; ++b) {
      const uint16_t* t = W + b * 4096;
      const int64_t k0 = (b % nkb) * 64;
      for (int kp = 0; kp < 32; ++kp) {  // pairs of k: 64 outputs x 2 bf16 = 4 vectors
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(t + kp * 128);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(t + kp * 128 + 32);
        const __m512bh w2 = (__m512bh)_mm512_loadu_si512(t + kp * 128 + 64);
        const __m512bh w3 = (__m512bh)_mm512_loadu_si512(t + kp * 128 + 96);
        for (int m = 0; m < MR; ++m) {
          uint32_t pair;
          std::memcpy(&pair, x + m * x_s + k0 + 2 * kp, 4);
          const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xv, w0);
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xv, w1);
          acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xv, w2);
          acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xv, w3);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(part + m * L.O + ob * 64 + u * 16, acc[m][u]);
  }
}
#endif

template <typename T>
void tiles(const Lin& L, int64_t M, const T* x, int64_t x_s, int64_t b0, int64_t b1, float* part);

template <>
void tiles<float>(const Lin& L, int64_t M, const float* x, int64_t x_s, int64_t b0, int64_t b1,
                  float* part) {
#if RKV_WIDE
  switch (M) {
    case 1: tiles_f32<1>(L, x, x_s, b0, b1, part); break;
    case 2: tiles_f32<2>(L, x, x_s, b0, b1, part); break;
    case 3: tiles_f32<3>(L, x, x_s, b0, b1, part); break;
    default: tiles_f32<4>(L, x, x_s, b0, b1, part); break;
  }
#else
  switch (M) {
    case 1: tiles_f32<1, 8>(L, x, x_s, b0, b1, part); break;
    case 2: tiles_f32<2, 4>(L, x, x_s, b0, b1, part); break;
    case 3: tiles_f32<3, 2>(L, x, x_s, b0, b1, part); break;
    default: tiles_f32<4, 2>(L, x, x_s, b0, b1, part); break;
  }
#endif
}

template <>
void tiles<uint16_t>(const Lin& L, int64_t M, const uint16_t* x, int64_t x_s, int64_t b0,
                     int64_t b1, float* part) {
#if defined(__AVX512BF16__)
  switch (M) {
    case 1: tiles_bf16<1>(L, x, x_s, b0, b1, part); break;
    case 2: tiles_bf16<2>(L, x, x_s, b0, b1, part); break;
    case 3: tiles_bf16<3>(L, x, x_s, b0, b1, part); break;
    default: tiles_bf16<4>(L, x, x_s, b0, b1, part); break;
  }
#else
  (void)L; (void)M; (void)x; (void)x_s; (void)b0; (void)b1; (void)part;
#endif
}

enum Epilogue { STORE, RESIDUAL, LOGITS };

// The epilogue every product kind shares, for outputs [o0, o0 + n) of M rows from float32
// sums r[m * r_s + j] (model-dtype bias, or null when the kernel added it already). STORE:
// out[m, o] = T(acc + b); RESIDUAL: out[m, o] = T(out + T(acc + b)) (the residual add);
// LOGITS: out (fp32) = T(acc).
template <typename T>
inline void finish(const T* bias, int64_t M, const float* r, int64_t r_s, int64_t o0,
                   int64_t n, void* out, int64_t out_s, Epilogue ep) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) {
      const float a = r[m * r_s + j];
      if (ep == LOGITS) { ((float*)out)[m * out_s + o0 + j] = rnd<T>(a); continue; }
      T* y = (T*)out + m * out_s + o0 + j;
      const float v = rnd<T>(bias ? a + ld(bias, o0 + j) : a);
      st(y, 0, ep == RESIDUAL ? ld(y, 0) + v : v);
    }
}

// ---- products on dense row-major weights (DENSE) -------------------------------------------
// Threads split the output rows into contiguous ranges (each weight row is read once, by one
// thread); J rows at a time share each vector of x (widened to float32 beforehand), and each
// weight vector serves all MR rows of x: MR * J accumulators, chosen so that MR * J + MR + 1
// <= 16 registers and at M = 1 eight independent FMA chains hide the FMA latency.

inline __m256 wload(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 wload(const uint16_t* p) {  // 8 bf16 -> 8 float32: widen, shift into the top half
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// r[m * J + j] = x row m . w row j (K a multiple of 8). `next` (the following block of J rows,
// or null) is prefetched as this one is read: each row is only K elements long, too short a
// stream for the hardware prefetcher to pick up before it ends (without this a batch-1 bf16
// step ran at ~8 GB/s, loads stalling, where the tiles of the float32 step reach ~16).
template <int MR, int J, typename T>
inline void dense_block(const T* w, int64_t K, const float* x, float* r, const T* next) {
  __m256 acc[MR][J];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm256_setzero_ps();
  const char* pf = (const char*)next;
  constexpr int step = J * 8 * (int)sizeof(T);  // bytes of `next` to prefetch per k step
  for (int64_t k = 0; k < K; k += 8) {
    if (pf) {
      for (int b = 0; b < step; b += 64) _mm_prefetch(pf + b, _MM_HINT_T0);
      pf += step;
    }
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
    for (int j = 0; j < J; ++j) {
      const __m256 wv = wload(w + j * K + k);
      for (int m = 0; m < MR; ++m) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) r[m * J + j] = hsum8(acc[m][j]);
}

template <int MR, int J, typename T>
void dense_rows(const Lin& L, const float* x32, void* out, int64_t out_s, Epilogue ep) {
#ifdef _OPENMP
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
  const int nt = 1, tid = 0;
#endif
  const T* W = (const T*)L.w;
  const int64_t K = L.K, nb = L.O / J;
  float r[MR * J];
  const int64_t bend = nb * (tid + 1) / nt;
  const T* bias = (const T*)L.bias;
  for (int64_t b = nb * tid / nt; b < bend; ++b) {
    dense_block<MR, J, T>(W + b * J * K, K, x32, r, b + 1 < bend ? W + (b + 1) * J * K : nullptr);
    finish<T>(bias, MR, r, J, b * J, J, out, out_s, ep);
  }
  if (tid == nt - 1)
    for (int64_t o = nb * J; o < L.O; ++o) {  // rows left over from the blocks of J
      dense_block<MR, 1, T>(W + o * K, K, x32, r, o + 1 < L.O ? W + (o + 1) * K : nullptr);
      finish<T>(bias, MR, r, 1, o, 1, out, out_s, ep);
    }
}

template <typename T>
void dense_product(const Lin& L, int64_t M, const float* x32, void* out, int64_t out_s,
                   Epilogue ep) {
  switch (M) {
    case 1: dense_rows<1, 8, T>(L, x32, out, out_s, ep); break;
    case 2: dense_rows<2, 4, T>(L, x32, out, out_s, ep); break;
    case 3: dense_rows<3, 3, T>(L, x32, out, out_s, ep); break;
    default: dense_rows<4, 2, T>(L, x32, out, out_s, ep); break;
  }
}

// y = x @ W^T (+ bias) on packed tiles, inside a parallel region (every thread calls it), then
// `finish`. `part` holds nt * M * O floats; M <= 4; ends with a barrier.
template <typename T>
void product(const Lin& L, int64_t M, const T* x, int64_t x_s, void* out, int64_t out_s,
             Epilogue ep, float* part) {
#ifdef _OPENMP
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
  const int nt = 1, tid = 0;
#endif
  const int64_t nkb = L.K / 64, nblk = (L.O / 64) * nkb;
  const int64_t b0 = nblk * tid / nt, b1 = nblk * (tid + 1) / nt;
  float* mine = part + (int64_t)tid * M * L.O;
  if (b1 > b0) tiles<T>(L, M, x, x_s, b0, b1, mine);
#pragma omp barrier
  // Epilogue over output blocks, split among the threads; block ob was summed by threads
  // t with b0(t) <= ob's last tile and b1(t) > its first tile.
  const int64_t nob = L.O / 64;
  for (int64_t ob = nob * tid / nt; ob < nob * (tid + 1) / nt; ++ob) {
    const int64_t first = ob * nkb, last = first + nkb;  // tiles [first, last)
    float acc[4 * 64] = {0};                              // [M, 64]
    for (int64_t m = 0; m < M; ++m)
      for (int t = 0; t < nt; ++t) {
        const int64_t tb0 = nblk * t / nt, tb1 = nblk * (t + 1) / nt;
        if (tb0 >= last || tb1 <= first) continue;
        const float* p = part + ((int64_t)t * M + m) * L.O + ob * 64;
        for (int j = 0; j < 64; ++j) acc[m * 64 + j] += p[j];
      }
    finish<T>((const T*)L.bias, M, acc, 64, ob * 64, 64, out, out_s, ep);
  }
#pragma omp barrier
}

// One product, from the calling thread: TILES and DENSE in a parallel region of their own,
// QGEMM on the packed low-bit kernel (which runs its own region; it adds the float32 bias
// itself) with float32 x / y and `finish` here. DENSE and QGEMM read x widened to float32.
template <typename T>
int64_t run_product(const Step& s, const Lin& L, const T* x, int64_t x_s, void* out,
                    int64_t out_s, Epilogue ep, float* part, float* x32, float* y32) {
  const int64_t M = s.M;
  if (L.kind == TILES) {
#pragma omp parallel num_threads(nthreads_of(s))
    product<T>(L, M, x, x_s, out, out_s, ep, part);
    return OK;
  }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < L.K; ++k) x32[m * L.K + k] = ld(x + m * x_s, k);
  if (L.kind == DENSE) {
#pragma omp parallel num_threads(nthreads_of(s))
    dense_product<T>(L, M, x32, out, out_s, ep);
    return OK;
  }
  const int64_t code = s.qgemm(L.fmt, M, L.O, L.K, x32, L.K, L.qs, L.scales,
                               (const float*)L.bias, y32, L.O, nthreads_of(s));
  if (code) return 200 + code;
  finish<T>(nullptr, M, y32, L.O, 0, L.O, out, out_s, ep);
  return OK;
}

// ---- small per-row ops (a few hundred elements: single-threaded) ---------------------------

// y = w * T(x / sqrt(mean(x^2) + eps)) per row, as rms_norm.cpp.
template <typename T>
void rms_norm(const T* x, const T* w, T* y, int64_t M, int64_t H, float eps) {
  for (int64_t m = 0; m < M; ++m) {
    const T* xr = x + m * H;
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
      for (int j = 0; j < 16; ++j) { const float v = ld(xr, i + j); part[j] += v * v; }
    float ss = 0.f;
    for (int j = 0; j < 16; ++j) ss += part[j];
    for (; i < H; ++i) { const float v = ld(xr, i); ss += v * v; }
    const float inv = 1.0f / std::sqrt(ss / (float)H + eps);
    for (int64_t k = 0; k < H; ++k) st(y + m * H, k, ld(w, k) * rnd<T>(ld(xr, k) * inv));
  }
}

// Rotary embedding of q and k heads of each qkv row in place (rope.cpp's rounding), then k
// and v into the row's slot of the layer's pool buffers.
template <typename T>
void rope_store(const Step& s, const Layer& L, T* qkv, int64_t qkv_s) {
  const int64_t half = s.d / 2, width = s.hkv * s.d;
  const T* cs = (const T*)s.cos;
  const T* sn = (const T*)s.sin;
  for (int64_t m = 0; m < s.M; ++m) {
    T* row = qkv + m * qkv_s;
    const T* c = cs + m * half;
    const T* si = sn + m * half;
    for (int64_t h = 0; h < s.hq + s.hkv; ++h) {
      T* r = row + h * s.d;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = ld(r, i), x2 = ld(r, i + half), ci = ld(c, i), sv = ld(si, i);
        const float a1 = rnd<T>(x1 * ci), b1 = rnd<T>(x2 * sv);
        const float a2 = rnd<T>(x2 * ci), b2 = rnd<T>(x1 * sv);
        st(r, i, a1 - b1);
        st(r, i + half, a2 + b2);
      }
    }
    std::memcpy((T*)L.k_buf + s.slots[m] * width, row + s.hq * s.d, sizeof(T) * width);
    std::memcpy((T*)L.v_buf + s.slots[m] * width, row + (s.hq + s.hkv) * s.d, sizeof(T) * width);
  }
}

// `struct Args` of radixkv/model/csrc/swiglu.cpp (rkv_swiglu's input).
struct SwigluArgs {
  int64_t N, I, dtype;
  const void* gu; int64_t gu_s;
  void* out; int64_t out_s;
  int64_t threads;
};

template <typename T>
int64_t step(const Step& s) {
  const int64_t M = s.M, H = s.H, I = s.I, d = s.d;
  const int64_t qkv_w = (s.hq + 2 * s.hkv) * d;
  const int nt = nthreads_of(s);
  int64_t widest = s.head.O, deepest = s.head.K;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const Layer& L = s.layers[l];
    for (const Lin* p : {&L.qkv, &L.o, &L.gate_up, &L.down}) {
      widest = p->O > widest ? p->O : widest;
      deepest = p->K > deepest ? p->K : deepest;
    }
  }
  std::vector<T> h((size_t)(M * H)), qkv((size_t)(M * qkv_w)), o((size_t)(M * s.hq * d));
  std::vector<T> gu((size_t)(M * 2 * I)), act((size_t)(M * I));
  std::vector<float> part((size_t)(nt * M * widest));
  std::vector<float> x32((size_t)(M * deepest)), y32((size_t)(M * widest));
  std::vector<int64_t> qo((size_t)(M + 1));
  for (int64_t m = 0; m <= M; ++m) qo[m] = m;
  T* x = (T*)s.x;
  const float eps = (float)s.eps;
  AttnArgs aa{};
  aa.n_q = M; aa.batch = M; aa.hq = s.hq; aa.hkv = s.hkv; aa.d = d; aa.rows = s.rows;
  aa.nnz = s.nnz;
  aa.q = qkv.data(); aa.q_sn = qkv_w; aa.q_sh = d;
  aa.k_ss = s.hkv * d; aa.k_sh = d; aa.v_ss = s.hkv * d; aa.v_sh = d;
  aa.o = o.data(); aa.o_sn = s.hq * d; aa.o_sh = d;
  aa.kv_indptr = s.kv_indptr; aa.kv_indices = s.kv_indices; aa.qo_indptr = qo.data();
  aa.req_list = nullptr; aa.n_req_list = -1;
  aa.sm_scale = s.sm_scale; aa.nthreads = nt;
  // silu(gate) * up, torch's rounding: the vectorised kernel of swiglu.cpp, on this thread.
  const SwigluArgs sw{M, I, s.dtype, gu.data(), 2 * I, act.data(), I, 1};
  float* pp = part.data();
  float* xb = x32.data();
  float* yb = y32.data();
  int64_t rc = OK;
  for (int64_t l = 0; l < s.n_layers && rc == OK; ++l) {
    const Layer& L = s.layers[l];
    rms_norm<T>(x, (const T*)L.norm1, h.data(), M, H, eps);
    rc = run_product<T>(s, L.qkv, h.data(), H, qkv.data(), qkv_w, STORE, pp, xb, yb);
    if (rc) break;
    rope_store<T>(s, L, qkv.data(), qkv_w);
    aa.k = L.k_buf; aa.v = L.v_buf;
    rc = s.attn(s.dtype, &aa);
    if (rc) { rc += 100; break; }  // (indices were validated before layer 0: not expected)
    rc = run_product<T>(s, L.o, o.data(), s.hq * d, x, H, RESIDUAL, pp, xb, yb);
    if (rc) break;
    rms_norm<T>(x, (const T*)L.norm2, h.data(), M, H, eps);
    rc = run_product<T>(s, L.gate_up, h.data(), H, gu.data(), 2 * I, STORE, pp, xb, yb);
    if (rc) break;
    s.swiglu(&sw);
    rc = run_product<T>(s, L.down, act.data(), I, x, H, RESIDUAL, pp, xb, yb);
  }
  if (rc) return rc;
  rms_norm<T>(x, (const T*)s.final_norm, h.data(), M, H, eps);
  return run_product<T>(s, s.head, h.data(), H, s.logits, s.head.O, LOGITS, pp, xb, yb);
}
#endif  // RKV_STEP

// Whether this build multiplies packed tiles of `dtype` (bfloat16 tiles need vdpbf16ps).
bool tiles_built(int64_t dtype) {
#if defined(__AVX512BF16__)
  return dtype == F32 || dtype == BF16;
#else
  return dtype == F32;
#endif
}

bool lin_ok(const Step& s, const Lin& L, int64_t O, int64_t K) {
  if (L.O != O || L.K != K) return false;
  if (L.kind == TILES) return L.w && O % 64 == 0 && K % 64 == 0 && tiles_built(s.dtype);
  if (L.kind == DENSE) return L.w && K % 8 == 0;
  return L.kind == QGEMM && s.qgemm && L.qs && L.scales;
}

}  // namespace

extern "C" {

// 1 when this build has the step for `dtype` (AVX-512 or AVX2 + FMA), else 0; with `tiles`,
// whether it also multiplies packed tiles of that dtype (bfloat16: AVX512-BF16 only).
int64_t rkv_step_supported(int64_t dtype, int64_t tiles) {
#if RKV_STEP
  if (dtype != F32 && dtype != BF16) return 0;
  return tiles ? (int64_t)tiles_built(dtype) : 1;
#else
  (void)dtype; (void)tiles;
  return 0;
#endif
}

// Runs the step. Every slot and index is checked before anything is written (0 = ok).
int64_t rkv_decode_step(const Step* sp) {
  const Step& s = *sp;
  if (!rkv_step_supported(s.dtype, 0) || !s.attn || !s.swiglu) return NO_KERNEL;
  if (s.M < 1 || s.M > 4 || s.hkv < 1 || s.hq % s.hkv || s.d % 2) return BAD_SHAPE;
  const int64_t qkv_w = (s.hq + 2 * s.hkv) * s.d;
  for (int64_t l = 0; l < s.n_layers; ++l) {
    const Layer& L = s.layers[l];
    if (!lin_ok(s, L.qkv, qkv_w, s.H) || !lin_ok(s, L.o, s.H, s.hq * s.d) ||
        !lin_ok(s, L.gate_up, 2 * s.I, s.H) || !lin_ok(s, L.down, s.H, s.I))
      return BAD_SHAPE;
  }
  if (!lin_ok(s, s.head, s.head.O, s.H)) return BAD_SHAPE;
  for (int64_t m = 0; m < s.M; ++m)
    if ((uint64_t)s.slots[m] >= (uint64_t)s.rows) return BAD_SLOT;
  const int64_t* ip = s.kv_indptr;
  if (ip[0] < 0 || ip[s.M] > s.nnz) return BAD_INDPTR;
  for (int64_t m = 0; m < s.M; ++m)
    if (ip[m + 1] < ip[m]) return BAD_INDPTR;
  for (int64_t i = ip[0]; i < ip[s.M]; ++i)
    if ((uint64_t)s.kv_indices[i] >= (uint64_t)s.rows) return BAD_SLOT;
#if RKV_STEP
  if (s.dtype == F32) return step<float>(s);
  if (s.dtype == BF16) return step<uint16_t>(s);
#endif
  return BAD_DTYPE;
}

}  // extern "C"
