// Decode attention for a batch whose requests all start with the same KV slots (a shared
// system prompt, parallel samples of one prompt), for the CPU.
//
// The plain decode kernel reads every request's whole context, so B requests over a P-token
// shared prefix read the prefix's K/V B times (32 requests x 650 tokens x 30 layers is ~1 GB a
// step in float32: attention was half of such a step). Here each KV head's prefix is read once
// per block of query rows: all B x G query rows of a KV head (G query heads share it) are
// scored against a 64-token block of the prefix as a small matrix product, with an online
// softmax per row; each request then continues its rows' softmax over its own suffix slots.
// No partial results are merged afterwards: a task owns whole rows from the first token to
// the last.
//
// Layouts as in paged_attention.cpp (strides in elements, last dim contiguous):
//   q, o [B, Hq, D]; k, v [rows, Hkv, D]; kv_indptr [B + 1], kv_indices [nnz] (int64, CSR).
//   The first `shared` slots of every request are the same slots (checked here).
// Accumulation is float32 for float32 and bfloat16 K/V; softmax in base 2 (q pre-scaled).

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int V = 16;  // floats per vector
#else
constexpr int V = 8;
#endif
typedef float vf __attribute__((vector_size(4 * V)));
typedef uint32_t vu __attribute__((vector_size(4 * V)));
typedef int32_t vi __attribute__((vector_size(4 * V)));
typedef uint16_t vh __attribute__((vector_size(2 * V)));

constexpr int BN = 64;  // prefix tokens per block
constexpr int RB = 48;  // query rows per task (a multiple of V)
constexpr int RT = 4;   // rows per register tile

struct bf16 { uint16_t bits; };

enum Status : int64_t { OK = 0, BAD_INDPTR = 1, BAD_SLOT = 2, BAD_SHARED = 3, BAD_DTYPE = 5 };

struct Args {
  int64_t batch, hq, hkv, d, rows, nnz, shared;
  const void* q; int64_t q_sn, q_sh;
  const void* k; int64_t k_ss, k_sh;
  const void* v; int64_t v_ss, v_sh;
  void* o; int64_t o_sn, o_sh;
  const int64_t* kv_indptr;
  const int64_t* kv_indices;
  double sm_scale;
  int64_t nthreads, dtype;
};  // shared_prefix.py packs it with struct.pack("<7q3q3q3q3q2qd2q")
static_assert(sizeof(Args) == 24 * 8, "Args must stay 24 packed 8-byte fields");

inline vf splat(float x) { return vf{} + x; }
inline vf vload(const float* p) { vf r; std::memcpy(&r, p, sizeof r); return r; }
inline vf vload(const bf16* p) {
  vh h; std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}
inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof x); }
inline float lane_sum(vf x) { float s = 0.f; for (int i = 0; i < V; ++i) s += x[i]; return s; }
inline float lane_max(vf x) { float m = x[0]; for (int i = 1; i < V; ++i) m = x[i] > m ? x[i] : m; return m; }

inline float widen(float x) { return x; }
inline float widen(bf16 x) { uint32_t u = (uint32_t)x.bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline void put(float* p, float x) { *p = x; }
inline void put(bf16* p, float x) {
  uint32_t u; std::memcpy(&u, &x, 4);
  p->bits = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)((u >> 16) | 0x40u)
                                            : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// 2^x for x <= 0 (scores minus their running max; -inf gives 0): x = i + f with f in [0, 1),
// 2^f by a degree-6 polynomial, 2^i through the exponent bits.
inline vf pow2(vf x) {
  const vf lo = splat(-125.f);
  const vi dead = x < lo;
  x = x < lo ? lo : x;
  const vf fl = __builtin_convertvector(__builtin_convertvector(x, vi), vf);
  const vf i = fl > x ? fl - 1.f : fl;  // floor (x <= 0: truncation rounds up)
  const vf f = x - i;
  vf p = splat(2.18712623e-4f);  // Chebyshev fit on [0, 1]: max relative error 1e-7
  p = p * f + 1.23824156e-3f;
  p = p * f + 9.68618598e-3f;
  p = p * f + 5.54789118e-2f;
  p = p * f + 2.40231097e-1f;
  p = p * f + 6.93146825e-1f;
  p = p * f + 1.f;
  const vi e = (__builtin_convertvector(i, vi) + 127) << 23;
  return (vf)(((vi)(p * (vf)e)) & ~dead);
}

// Rows are the vector lanes: query rows r (request r / G, head hk * G + r % G) sit side by
// side, so the softmax of a block needs no horizontal reductions (max and sum run down the
// tokens, one vector of rows at a time) and both products are outer products from broadcasts.
//   qT [D][ld]   scaled queries, transposed     m, l [ld]   running max and sum per row
//   sT [BN][ld]  scores, then probabilities      acc [n][D]  output accumulators, row-major
struct Tile {
  int n;        // rows in use
  int ld;       // row capacity (a multiple of V) = the row stride of qT and sT
  float* qT;
  float* m;
  float* l;
  float* sT;
  float* acc;
};

// sT[t, rows] = sum_j k[t, j] qT[j, rows] for NT tokens x RV row vectors in registers.
template <int NT, int RV>
void score_tile(const Tile& T, const float* kb, int64_t d, int t0) {
  vf acc[NT][RV];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < RV; ++u) acc[t][u] = splat(0.f);
  for (int64_t j = 0; j < d; ++j) {
    vf qv[RV];
    for (int u = 0; u < RV; ++u) qv[u] = vload(T.qT + j * T.ld + u * V);
    for (int t = 0; t < NT; ++t) {
      const vf kj = splat(kb[(t0 + t) * d + j]);
      for (int u = 0; u < RV; ++u) acc[t][u] += kj * qv[u];
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < RV; ++u) vstore(T.sT + (t0 + t) * T.ld + u * V, acc[t][u]);
}

template <int RV>
void score_rv(const Tile& T, const float* kb, int64_t d, int nt) {
  int t = 0;
  // One row vector (a request's own rows): 8 tokens per tile keep 8 FMA chains in flight.
  if (RV == 1)
    for (; t + 8 <= nt; t += 8) score_tile<8, 1>(T, kb, d, t);
  for (; t + 4 <= nt; t += 4) score_tile<4, RV>(T, kb, d, t);
  switch (nt - t) {
    case 1: score_tile<1, RV>(T, kb, d, t); break;
    case 2: score_tile<2, RV>(T, kb, d, t); break;
    case 3: score_tile<3, RV>(T, kb, d, t); break;
    default: break;
  }
}

constexpr int MAX_RV = RB / V;  // row vectors of a full task

void score_block(const Tile& T, const float* kb, int64_t d, int nt) {
  switch ((T.n + V - 1) / V) {
    case 1: score_rv<1>(T, kb, d, nt); break;
    case 2: score_rv<2 <= MAX_RV ? 2 : 1>(T, kb, d, nt); break;
    case 3: score_rv<3 <= MAX_RV ? 3 : 1>(T, kb, d, nt); break;
    case 4: score_rv<4 <= MAX_RV ? 4 : 1>(T, kb, d, nt); break;
    case 5: score_rv<5 <= MAX_RV ? 5 : 1>(T, kb, d, nt); break;
    default: score_rv<MAX_RV>(T, kb, d, nt); break;
  }
}

// acc[r, c .. c + NC vectors) += sum_t p[t, r] v[t, c ..] for NR rows, in registers.
template <int NR, int NC>
void pv_tile(const Tile& T, int r0, const float* vb, int64_t d, int64_t c, int nt) {
  vf o[NR][NC];
  float* acc = T.acc + r0 * d + c;
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NC; ++u) o[r][u] = vload(acc + r * d + u * V);
  for (int t = 0; t < nt; ++t) {
    vf vv[NC];
    for (int u = 0; u < NC; ++u) vv[u] = vload(vb + t * d + c + u * V);
    const float* p = T.sT + t * T.ld + r0;
    for (int r = 0; r < NR; ++r) {
      const vf pr = splat(p[r]);
      for (int u = 0; u < NC; ++u) o[r][u] += pr * vv[u];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int u = 0; u < NC; ++u) vstore(acc + r * d + u * V, o[r][u]);
}

template <int NR>
void pv_rows(const Tile& T, int r0, const float* vb, int64_t d, int nt) {
  const int64_t dv = d / V;
  for (int64_t c = 0; c < dv; c += 4) {
    switch (dv - c < 4 ? dv - c : 4) {
      case 1: pv_tile<NR, 1>(T, r0, vb, d, c * V, nt); break;
      case 2: pv_tile<NR, 2>(T, r0, vb, d, c * V, nt); break;
      case 3: pv_tile<NR, 3>(T, r0, vb, d, c * V, nt); break;
      default: pv_tile<NR, 4>(T, r0, vb, d, c * V, nt); break;
    }
  }
}

// One block of nt tokens (K rows kb [nt][D], V rows vb [nt][D], float32): scores, online
// softmax down the tokens for every row vector, then acc += P @ V.
void block(const Tile& T, const float* kb, const float* vb, int64_t d, int nt) {
  score_block(T, kb, d, nt);
  const int rv = (T.n + V - 1) / V;
  float alpha[RB];
  for (int u = 0; u < rv; ++u) {
    vf mx = vload(T.sT + u * V);
    for (int t = 1; t < nt; ++t) {
      const vf x = vload(T.sT + t * T.ld + u * V);
      mx = x > mx ? x : mx;
    }
    const vf m_old = vload(T.m + u * V);
    const vf m_new = mx > m_old ? mx : m_old;
    const vf al = pow2(m_old - m_new);
    vstore(T.m + u * V, m_new);
    vf ls = splat(0.f);
    for (int t = 0; t < nt; ++t) {
      const vf p = pow2(vload(T.sT + t * T.ld + u * V) - m_new);
      vstore(T.sT + t * T.ld + u * V, p);
      ls += p;
    }
    vstore(T.l + u * V, vload(T.l + u * V) * al + ls);
    vstore(alpha + u * V, al);
  }
  for (int r = 0; r < T.n; ++r)
    if (alpha[r] != 1.f)
      for (int64_t j = 0; j < d; j += V) vstore(T.acc + r * d + j, vload(T.acc + r * d + j) * alpha[r]);
  for (int r0 = 0; r0 < T.n; r0 += RT) {
    switch (T.n - r0 < RT ? T.n - r0 : RT) {
      case 1: pv_rows<1>(T, r0, vb, d, nt); break;
      case 2: pv_rows<2>(T, r0, vb, d, nt); break;
      case 3: pv_rows<3>(T, r0, vb, d, nt); break;
      default: pv_rows<RT>(T, r0, vb, d, nt); break;
    }
  }
}

// Tokens idx[0 .. nt) of KV head hk, widened to float32: K into kb, V into vb ([nt][D] each).
template <typename T>
void gather(const Args& a, const int64_t* idx, int nt, int64_t hk, float* kb, float* vb) {
  const T* kbase = (const T*)a.k;
  const T* vbase = (const T*)a.v;
  for (int t = 0; t < nt; ++t) {
    const T* kp = kbase + idx[t] * a.k_ss + hk * a.k_sh;
    const T* vp = vbase + idx[t] * a.v_ss + hk * a.v_sh;
    for (int64_t j = 0; j < a.d; j += V) {
      vstore(kb + t * a.d + j, vload(kp + j));
      vstore(vb + t * a.d + j, vload(vp + j));
    }
  }
}

// Per-thread scratch of a task.
struct Scratch {
  std::vector<float> qT, m, l, sT, acc, kb, vb;      // the task's rows
  std::vector<float> sub_qT, sub_m, sub_l;           // one request's rows (its suffix)
  Scratch(int64_t d)
      : qT((size_t)(d * RB)), m(RB), l(RB), sT((size_t)(BN * RB)), acc((size_t)(RB * d)),
        kb((size_t)(BN * d)), vb((size_t)(BN * d)), sub_qT((size_t)(d * V)), sub_m(V),
        sub_l(V) {}
};

// One task: KV head hk, query rows [r0, r0 + n) of that head, over the shared prefix and then
// each request's own suffix.
template <typename T>
void task(const Args& a, int64_t hk, int64_t r0, int n, Scratch& w) {
  const int64_t g = a.hq / a.hkv, d = a.d;
  const float scale = (float)(a.sm_scale * 1.4426950408889634);
  const T* qb = (const T*)a.q;
  std::fill(w.qT.begin(), w.qT.end(), 0.f);
  for (int r = 0; r < n; ++r) {
    const int64_t b = (r0 + r) / g, h = hk * g + (r0 + r) % g;
    const T* src = qb + b * a.q_sn + h * a.q_sh;
    for (int64_t j = 0; j < d; ++j) w.qT[j * RB + r] = widen(src[j]) * scale;
  }
  std::fill(w.m.begin(), w.m.end(), -__builtin_inff());
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  const Tile all{n, RB, w.qT.data(), w.m.data(), w.l.data(), w.sT.data(), w.acc.data()};
  const int64_t* idx0 = a.kv_indices + a.kv_indptr[0];
  for (int64_t j0 = 0; j0 < a.shared; j0 += BN) {
    const int nt = (int)(a.shared - j0 < BN ? a.shared - j0 : BN);
    gather<T>(a, idx0 + j0, nt, hk, w.kb.data(), w.vb.data());
    block(all, w.kb.data(), w.vb.data(), d, nt);
  }
  // Suffixes: the rows of one request at a time, as a tile of their own (at most G rows).
  for (int r = 0; r < n;) {
    const int64_t b = (r0 + r) / g;
    int e = r;
    while (e < n && (r0 + e) / g == b) ++e;
    const int k = e - r;
    std::fill(w.sub_qT.begin(), w.sub_qT.end(), 0.f);
    for (int64_t j = 0; j < d; ++j)
      for (int i = 0; i < k; ++i) w.sub_qT[j * V + i] = w.qT[j * RB + r + i];
    std::fill(w.sub_m.begin(), w.sub_m.end(), -__builtin_inff());
    std::fill(w.sub_l.begin(), w.sub_l.end(), 0.f);
    for (int i = 0; i < k; ++i) { w.sub_m[i] = w.m[r + i]; w.sub_l[i] = w.l[r + i]; }
    const Tile one{k, V, w.sub_qT.data(), w.sub_m.data(), w.sub_l.data(), w.sT.data(),
                   w.acc.data() + r * d};
    const int64_t beg = a.kv_indptr[b] + a.shared, end = a.kv_indptr[b + 1];
    for (int64_t j0 = beg; j0 < end; j0 += BN) {
      const int nt = (int)(end - j0 < BN ? end - j0 : BN);
      gather<T>(a, a.kv_indices + j0, nt, hk, w.kb.data(), w.vb.data());
      block(one, w.kb.data(), w.vb.data(), d, nt);
    }
    for (int i = 0; i < k; ++i) w.l[r + i] = w.sub_l[i];
    r = e;
  }
  T* ob = (T*)a.o;
  for (int r = 0; r < n; ++r) {
    const int64_t b = (r0 + r) / g, h = hk * g + (r0 + r) % g;
    const float inv = w.l[r] > 0.f ? 1.f / w.l[r] : 0.f;
    T* dst = ob + b * a.o_sn + h * a.o_sh;
    for (int64_t j = 0; j < d; ++j) put(dst + j, w.acc[r * d + j] * inv);
  }
}

template <typename T>
int64_t run(const Args& a) {
  const int64_t g = a.hq / a.hkv, rows = a.batch * g;
  const int64_t blocks = (rows + RB - 1) / RB, ntasks = blocks * a.hkv;
  const int nt = a.nthreads > 0 ? (int)a.nthreads : 1;
#pragma omp parallel num_threads(nt) if (nt > 1 && ntasks > 1)
  {
    Scratch w(a.d);
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t hk = t % a.hkv, r0 = (t / a.hkv) * RB;
      const int n = (int)(rows - r0 < RB ? rows - r0 : RB);
      task<T>(a, hk, r0, n, w);
    }
  }
  return OK;
}

int64_t check(const Args& a) {
  const int64_t* ip = a.kv_indptr;
  if (ip[0] < 0 || ip[a.batch] > a.nnz) return BAD_INDPTR;
  for (int64_t b = 0; b < a.batch; ++b) {
    if (ip[b + 1] < ip[b]) return BAD_INDPTR;
    if (ip[b + 1] - ip[b] < a.shared) return BAD_SHARED;
  }
  for (int64_t i = ip[0]; i < ip[a.batch]; ++i)
    if ((uint64_t)a.kv_indices[i] >= (uint64_t)a.rows) return BAD_SLOT;
  const int64_t* first = a.kv_indices + ip[0];
  for (int64_t b = 1; b < a.batch; ++b)
    if (std::memcmp(first, a.kv_indices + ip[b], sizeof(int64_t) * a.shared)) return BAD_SHARED;
  return OK;
}

}  // namespace

extern "C" {

// head_dim must be a multiple of this (and at most 128 columns of registers are used).
int64_t rkv_shared_width() { return V; }

// dtype 0: float32 q / K / V / o; 1: bfloat16. Returns 0, or a Status before writing anything.
int64_t rkv_shared_prefix_decode(const Args* a) {
  if (a->hkv < 1 || a->hq % a->hkv || a->d % V || a->d > 128 || a->shared < 0) return BAD_DTYPE;
  const int64_t st = check(*a);
  if (st != OK) return st;
  if (a->dtype == 0) return run<float>(*a);
  if (a->dtype == 1) return run<bf16>(*a);
  return BAD_DTYPE;
}

}  // extern "C"
