// Fused paged attention for the CPU: reads K/V rows straight from the pool through slot indices.
//
// Built at first use by radixkv/attention/cpu_kernels.py (g++ -O3 -march=native -fopenmp) and
// called through ctypes with raw pointers, so it needs no torch or Python headers and compiles in
// a few seconds. Layouts (strides in elements, last dim contiguous):
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
// Return codes (0 = ok) are decoded into typed Python errors by cpu_kernels.py.

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int W = 8;  // floats per vector
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(32)));
typedef uint16_t vu16 __attribute__((vector_size(16)));
typedef _Float16 vh __attribute__((vector_size(16)));

struct bf16 { uint16_t bits; };

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

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
// ~2e-9, well under float32 rounding.
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

struct Args {
  int64_t n_q, batch, hq, hkv, d, rows, nnz;
  const void* q; int64_t q_sn, q_sh;
  const void* k; int64_t k_ss, k_sh;
  const void* v; int64_t v_ss, v_sh;
  void* o; int64_t o_sn, o_sh;
  const int64_t* kv_indptr;
  const int64_t* kv_indices;
  const int64_t* qo_indptr;  // extend only
  const int64_t* req_list;   // extend only: the requests to compute (nullptr: all of them)
  int64_t n_req_list;
  float sm_scale;
  int64_t nthreads;
};

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

// ---- decode -------------------------------------------------------------------------------
// One task = one request's chunk of KV tokens, all heads at once, so each K/V row (all KV heads
// of a slot, contiguous in the pool) is read from memory exactly once. Long requests are split
// into chunks whose partial (max, sum, acc) are merged afterwards (log-sum-exp combine).

constexpr int DEC_BLK = 32;  // tokens scored before one softmax rescale

struct Partial { float* m; float* l; float* acc; };  // [Hq], [Hq], [Hq, D]

template <typename T, int DV>
void decode_chunk(const Args& a, int dv_rt, const float* qs, int64_t beg, int64_t end,
                  Partial out, float* s /* [Hq, DEC_BLK] */) {
  const int dv = DV ? DV : dv_rt;
  const int64_t hq = a.hq, hkv = a.hkv, g = hq / hkv, d = a.d;
  const T* kb = (const T*)a.k;
  const T* vb = (const T*)a.v;
  for (int64_t h = 0; h < hq; ++h) {
    out.m[h] = -__builtin_inff();
    out.l[h] = 0.f;
    std::memset(out.acc + h * d, 0, sizeof(float) * d);
  }
  for (int64_t t0 = beg; t0 < end; t0 += DEC_BLK) {
    const int n = (int)(end - t0 < DEC_BLK ? end - t0 : DEC_BLK);
    const int64_t* idx = a.kv_indices + t0;
    // Scores s[h, t] = q_h . k_t (q already scaled into base 2).
    for (int t = 0; t < n; ++t) {
      const T* krow = kb + idx[t] * a.k_ss;
      if (t + 1 < n) __builtin_prefetch(kb + idx[t + 1] * a.k_ss);
      for (int64_t hk = 0; hk < hkv; ++hk) {
        const T* kp = krow + hk * a.k_sh;
        for (int64_t gi = 0; gi < g; ++gi) {
          const int64_t h = hk * g + gi;
          const float* qp = qs + h * d;
          vf acc0 = splat(0.f), acc1 = splat(0.f);
          int j = 0;
          for (; j + 1 < dv; j += 2) {
            acc0 += load(qp + j * W) * load(kp + j * W);
            acc1 += load(qp + (j + 1) * W) * load(kp + (j + 1) * W);
          }
          if (j < dv) acc0 += load(qp + j * W) * load(kp + j * W);
          s[h * DEC_BLK + t] = hsum(acc0 + acc1);
        }
      }
    }
    // Online softmax: rescale the running sums once per block.
    for (int64_t h = 0; h < hq; ++h) {
      float* sh = s + h * DEC_BLK;
      float mb = sh[0];
      for (int t = 1; t < n; ++t) mb = sh[t] > mb ? sh[t] : mb;
      const float m_new = mb > out.m[h] ? mb : out.m[h];
      const float alpha = exp2s(out.m[h] - m_new);
      out.m[h] = m_new;
      float lsum = 0.f;
      int t = 0;
      for (; t + W <= n; t += W) {
        vf p = exp2v(load(sh + t) - splat(m_new));
        store(sh + t, p);
        lsum += hsum(p);
      }
      for (; t < n; ++t) { sh[t] = exp2s(sh[t] - m_new); lsum += sh[t]; }
      out.l[h] = out.l[h] * alpha + lsum;
      if (alpha != 1.f) {
        float* ah = out.acc + h * d;
        for (int j = 0; j < dv; ++j) store(ah + j * W, load(ah + j * W) * splat(alpha));
      }
    }
    // acc_h += sum_t p[h, t] * v_t, one head at a time so acc_h stays in registers.
    for (int64_t hk = 0; hk < hkv; ++hk) {
      for (int64_t gi = 0; gi < g; ++gi) {
        const int64_t h = hk * g + gi;
        float* ah = out.acc + h * d;
        const float* ph = s + h * DEC_BLK;
        if (DV) {
          vf acc[DV ? DV : 1];
          for (int j = 0; j < DV; ++j) acc[j] = load(ah + j * W);
          for (int t = 0; t < n; ++t) {
            const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
            const vf p = splat(ph[t]);
            for (int j = 0; j < DV; ++j) acc[j] += p * load(vp + j * W);
          }
          for (int j = 0; j < DV; ++j) store(ah + j * W, acc[j]);
        } else {
          for (int t = 0; t < n; ++t) {
            const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
            const vf p = splat(ph[t]);
            for (int j = 0; j < dv; ++j) store(ah + j * W, load(ah + j * W) + p * load(vp + j * W));
          }
        }
      }
    }
  }
}

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

template <typename T, int DV>
int64_t decode_impl(const Args& a) {
  const int64_t B = a.batch, hq = a.hq, d = a.d;
  const int nt = nthreads_of(a);
  const float scale = a.sm_scale * 1.4426950408889634f;
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

#pragma omp parallel num_threads(nt) if (nt > 1 && ntasks > 1)
  {
    std::vector<float> qs((size_t)(hq * d)), s((size_t)(hq * DEC_BLK));
    int64_t q_row = -1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      // Find the request of this task (tasks are few; a linear scan from a hint is cheap).
      int64_t b = 0;
      {
        int64_t lo = 0, hi = B;  // first b with task_start[b + 1] > task
        while (lo < hi) {
          int64_t mid = (lo + hi) / 2;
          if (task_start[mid + 1] > task) hi = mid; else lo = mid + 1;
        }
        b = lo;
      }
      const int64_t c = task - task_start[b];
      const int64_t beg = a.kv_indptr[b] + c * chunk;
      int64_t end = beg + chunk;
      if (end > a.kv_indptr[b + 1]) end = a.kv_indptr[b + 1];
      if (q_row != b) { load_q<T>(a, b, scale, qs.data()); q_row = b; }
      float* p = part.data() + task * pstride;
      Partial out{p, p + hq, p + 2 * hq};
      decode_chunk<T, DV>(a, (int)(d / W), qs.data(), beg, end, out, s.data());
    }
    // Merge the chunks of each request and write o.
    std::vector<float> l((size_t)hq), acc((size_t)(hq * d));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t0 = task_start[b], t1 = task_start[b + 1];
      const float* p0 = part.data() + t0 * pstride;
      if (t1 - t0 == 1) { store_o<T>(a, b, p0, p0 + hq, p0 + 2 * hq); continue; }
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
// serves G heads. K blocks are transposed into a float tile so scores vectorise over tokens.

constexpr int EXT_BM = 16;  // queries per tile
constexpr int EXT_BN = 64;  // KV tokens per block

template <typename T, int DV>
void extend_tile(const Args& a, int dv_rt, int64_t b, int64_t qt0, int64_t qt1, int64_t hk,
                 float* qs, float* sc, float* kt, float* vt, float* acc, float* m, float* l) {
  const int dv = DV ? DV : dv_rt;
  const int64_t g = a.hq / a.hkv, d = a.d;
  const int64_t q_beg = a.qo_indptr[b], n_new = a.qo_indptr[b + 1] - q_beg;
  const int64_t kv0 = a.kv_indptr[b], kv_len = a.kv_indptr[b + 1] - kv0;
  const int64_t prefix = kv_len - n_new;
  const int64_t nq = qt1 - qt0, R = nq * g;  // rows: r = qi * g + gi
  const float scale = a.sm_scale * 1.4426950408889634f;
  const T* kb = (const T*)a.k;
  const T* vb = (const T*)a.v;
  const T* qb = (const T*)a.q;
  for (int64_t qi = 0; qi < nq; ++qi)
    for (int64_t gi = 0; gi < g; ++gi) {
      const T* src = qb + (q_beg + qt0 + qi) * a.q_sn + (hk * g + gi) * a.q_sh;
      float* dst = qs + (qi * g + gi) * d;
      for (int64_t j = 0; j < d; j += W) store(dst + j, load(src + j) * splat(scale));
    }
  for (int64_t r = 0; r < R; ++r) { m[r] = -__builtin_inff(); l[r] = 0.f; }
  std::memset(acc, 0, sizeof(float) * R * d);
  // Query qi sits at position prefix + qt0 + qi and sees positions 0 .. that position.
  const int64_t kv_end = prefix + qt1;
  for (int64_t j0 = 0; j0 < kv_end; j0 += EXT_BN) {
    const int n = (int)(kv_end - j0 < EXT_BN ? kv_end - j0 : EXT_BN);
    const int nv = (n + W - 1) / W;
    const int64_t* idx = a.kv_indices + kv0 + j0;
    // Gather: kt[dd, t] = K[slot_t, hk, dd] (transposed), vt[t, :] = V[slot_t, hk, :].
    for (int t = 0; t < n; ++t) {
      const T* kp = kb + idx[t] * a.k_ss + hk * a.k_sh;
      const T* vp = vb + idx[t] * a.v_ss + hk * a.v_sh;
      for (int64_t j = 0; j < d; j += W) {
        vf kv = load(kp + j);
        for (int e = 0; e < W; ++e) kt[(j + e) * EXT_BN + t] = kv[e];
        store(vt + t * d + j, load(vp + j));
      }
    }
    for (int t = n; t < nv * W; ++t)
      for (int64_t dd = 0; dd < d; ++dd) kt[dd * EXT_BN + t] = 0.f;
    // Scores sc[r, t] = q_r . k_t, two rows at a time to reuse each loaded K vector.
    int64_t r = 0;
    for (; r + 1 < R; r += 2) {
      vf s0[EXT_BN / W], s1[EXT_BN / W];
      for (int c = 0; c < nv; ++c) { s0[c] = splat(0.f); s1[c] = splat(0.f); }
      const float* q0 = qs + r * d;
      const float* q1 = q0 + d;
      for (int64_t dd = 0; dd < d; ++dd) {
        const vf a0 = splat(q0[dd]), a1 = splat(q1[dd]);
        const float* krow = kt + dd * EXT_BN;
        for (int c = 0; c < nv; ++c) {
          const vf kv = load(krow + c * W);
          s0[c] += a0 * kv;
          s1[c] += a1 * kv;
        }
      }
      for (int c = 0; c < nv; ++c) {
        store(sc + r * EXT_BN + c * W, s0[c]);
        store(sc + (r + 1) * EXT_BN + c * W, s1[c]);
      }
    }
    for (; r < R; ++r) {
      vf s0[EXT_BN / W];
      for (int c = 0; c < nv; ++c) s0[c] = splat(0.f);
      const float* q0 = qs + r * d;
      for (int64_t dd = 0; dd < d; ++dd) {
        const vf a0 = splat(q0[dd]);
        for (int c = 0; c < nv; ++c) s0[c] += a0 * load(kt + dd * EXT_BN + c * W);
      }
      for (int c = 0; c < nv; ++c) store(sc + r * EXT_BN + c * W, s0[c]);
    }
    // Causal mask, online softmax and acc += p @ V for each row.
    for (r = 0; r < R; ++r) {
      const int64_t qpos = prefix + qt0 + r / g;
      const int64_t lim = qpos - j0 + 1;  // columns t < lim are visible
      if (lim <= 0) continue;
      const int nvis = lim < n ? (int)lim : n;
      float* sr = sc + r * EXT_BN;
      for (int t = nvis; t < nv * W; ++t) sr[t] = -__builtin_inff();
      vf mv = load(sr);
      for (int c = 1; c < nv; ++c) mv = vmax(mv, load(sr + c * W));
      const float mb = hmax(mv);
      const float m_new = mb > m[r] ? mb : m[r];
      const float alpha = exp2s(m[r] - m_new);
      m[r] = m_new;
      vf ls = splat(0.f);
      for (int c = 0; c < nv; ++c) {
        const vf p = exp2v(load(sr + c * W) - splat(m_new));
        store(sr + c * W, p);
        ls += p;
      }
      l[r] = l[r] * alpha + hsum(ls);
      float* ar = acc + r * d;
      if (DV) {
        vf o[DV ? DV : 1];
        for (int j = 0; j < DV; ++j) o[j] = load(ar + j * W) * splat(alpha);
        for (int t = 0; t < nvis; ++t) {
          const vf p = splat(sr[t]);
          const float* vr = vt + t * d;
          for (int j = 0; j < DV; ++j) o[j] += p * load(vr + j * W);
        }
        for (int j = 0; j < DV; ++j) store(ar + j * W, o[j]);
      } else {
        for (int j = 0; j < dv; ++j) store(ar + j * W, load(ar + j * W) * splat(alpha));
        for (int t = 0; t < nvis; ++t) {
          const vf p = splat(sr[t]);
          const float* vr = vt + t * d;
          for (int j = 0; j < dv; ++j) store(ar + j * W, load(ar + j * W) + p * load(vr + j * W));
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

template <typename T, int DV>
int64_t extend_impl(const Args& a) {
  const int64_t g = a.hq / a.hkv, d = a.d;
  // Requests to compute: all, or the caller's subset (the rest go to another path).
  const int64_t B = a.req_list ? a.n_req_list : a.batch;
  auto req = [&](int64_t i) { return a.req_list ? a.req_list[i] : i; };
  // Tasks: (request, query tile) pairs times KV heads.
  std::vector<int64_t> tile_start(B + 1);
  tile_start[0] = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int64_t b = req(i);
    const int64_t n_new = a.qo_indptr[b + 1] - a.qo_indptr[b];
    tile_start[i + 1] = tile_start[i] + (n_new + EXT_BM - 1) / EXT_BM;
  }
  const int64_t ntiles = tile_start[B], ntasks = ntiles * a.hkv;
  const int nt = nthreads_of(a);
#pragma omp parallel num_threads(nt) if (nt > 1 && ntasks > 1)
  {
    const int64_t R = EXT_BM * g;
    std::vector<float> qs((size_t)(R * d)), sc((size_t)(R * EXT_BN)), kt((size_t)(d * EXT_BN)),
        vt((size_t)(EXT_BN * d)), acc((size_t)(R * d)), m((size_t)R), l((size_t)R);
    // Later tiles of a request see more KV (causal), so hand out tasks from the end first.
#pragma omp for schedule(dynamic, 1)
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
      const int64_t qt0 = (tile - tile_start[lo]) * EXT_BM;
      const int64_t qt1 = qt0 + EXT_BM < n_new ? qt0 + EXT_BM : n_new;
      extend_tile<T, DV>(a, (int)(d / W), b, qt0, qt1, hk, qs.data(), sc.data(), kt.data(),
                         vt.data(), acc.data(), m.data(), l.data());
    }
  }
  return OK;
}

template <typename T, int64_t (*F8)(const Args&), int64_t (*F16)(const Args&),
          int64_t (*F0)(const Args&)>
int64_t by_dim(const Args& a) {
  if (a.d == 8 * W) return F8(a);
  if (a.d == 16 * W) return F16(a);
  return F0(a);
}

template <typename T>
int64_t decode_t(const Args& a) {
  return by_dim<T, decode_impl<T, 8>, decode_impl<T, 16>, decode_impl<T, 0>>(a);
}
template <typename T>
int64_t extend_t(const Args& a) {
  return by_dim<T, extend_impl<T, 8>, extend_impl<T, 16>, extend_impl<T, 0>>(a);
}

}  // namespace

extern "C" {

// Returns the vector width in floats the kernels assume: head_dim must be a multiple of it.
int64_t rkv_vector_width() { return W; }

int64_t rkv_decode(int64_t dtype, const Args* a) {
  const int64_t st = check_csr(*a);
  if (st != OK) return st;
  switch (dtype) {
    case F32: return decode_t<float>(*a);
    case BF16: return decode_t<bf16>(*a);
    case F16: return decode_t<_Float16>(*a);
    default: return BAD_DTYPE;
  }
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
  for (int64_t i = 0; a->req_list && i < a->n_req_list; ++i)
    if (a->req_list[i] < 0 || a->req_list[i] >= a->batch) return BAD_REQ_LIST;
  switch (dtype) {
    case F32: return extend_t<float>(*a);
    case BF16: return extend_t<bf16>(*a);
    case F16: return extend_t<_Float16>(*a);
    default: return BAD_DTYPE;
  }
}

}  // extern "C"
