// Slot allocator hot path of radixkv.memory.kv_pool, called through ctypes (radixkv/memory/native.py).
//
// Each call does in one pass what the numpy reference (kv_pool.py) does with a handful of
// vectorised calls: validate a batch of slots against the per-slot state array and change their
// state, push or pop the free stack. Every function validates everything before it writes
// anything, so a failed call leaves the pool exactly as it was (the Python side then names the
// offending slot with the reference's messages).
//
// Calling convention: one argument, a packed little-endian int64 record (struct.pack on the
// Python side): ctypes converts each argument separately at ~0.3 us apiece, one bytes object is
// the cheapest thing to pass. Every record starts with the pool's fixed fields:
//   [0] state   uint8 [num_slots + 1]   _FREE 0, _USED 1, _RESERVED 2, _TREE 3
//   [1] stack   int64 [num_slots]       free slots in stack[0 : n_free], top at the end
//   [2] (unused, 0)
//   [3] num_slots
// followed by the call's own fields, listed at each function.

#include <cstdint>
#include <cstring>

namespace {

struct Pool {
    uint8_t* state;
    int64_t* stack;
    int64_t* unused;
    int64_t num_slots;
};

const Pool& pool_of(const int64_t* a) { return *reinterpret_cast<const Pool*>(a); }

constexpr uint8_t kSeen = 0xFF;  // transient state of a slot already seen in this call

// 0 if every slot is in 1..num_slots, in state `want` and (with distinct) listed once, leaving
// those slots marked kSeen (with distinct) for the caller to finish; else 1 + the index of the
// first bad one, with every state as it was. Repeats are found through the state array itself
// (a second sight finds kSeen instead of `want`), so only bytes the call must touch anyway are
// touched: no side table of num_slots entries to miss in the cache.
int64_t check(const Pool& p, const int64_t* slots, int64_t n, int64_t want, int64_t distinct) {
    const uint64_t limit = (uint64_t)p.num_slots;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = slots[i];
        if ((uint64_t)(s - 1) >= limit || p.state[s] != (uint8_t)want) {
            if (distinct)
                for (int64_t j = 0; j < i; ++j) p.state[slots[j]] = (uint8_t)want;
            return i + 1;
        }
        if (distinct) p.state[s] = kSeen;
    }
    return 0;
}

}  // namespace

extern "C" {

// Fields: [4] src, [5] n, [6] out (may equal src), [7] want, [8] set_to, [9] distinct.
// Check src[0:n] (see check), then set their state to set_to and copy them to out. Returns 0,
// or 1 + the index of the first bad slot with nothing changed.
int64_t rkv_take(const int64_t* a) {
    const Pool& p = pool_of(a);
    const int64_t* src = reinterpret_cast<const int64_t*>(a[4]);
    const int64_t n = a[5];
    int64_t* out = reinterpret_cast<int64_t*>(a[6]);
    const int64_t bad = check(p, src, n, a[7], a[9]);
    if (bad) return bad;
    if (a[8] != a[7] || a[9])
        for (int64_t i = 0; i < n; ++i) p.state[src[i]] = (uint8_t)a[8];
    if (out != src) std::memmove(out, src, (size_t)n * sizeof(int64_t));
    return 0;
}

// Fields: [4] src, [5] n, [6] n_free, [7] push. Mark src[0:n] (known valid and distinct) free
// and, with push, put them on the free stack. Returns the new free count, or -1 (nothing
// changed) if the stack would overflow: then some of them were free already.
int64_t rkv_release(const int64_t* a) {
    const Pool& p = pool_of(a);
    const int64_t* src = reinterpret_cast<const int64_t*>(a[4]);
    const int64_t n = a[5];
    if (a[7] && (n > p.num_slots || a[6] > p.num_slots - n)) return -1;
    for (int64_t i = 0; i < n; ++i) p.state[src[i]] = 0;
    if (!a[7]) return a[6];
    std::memcpy(p.stack + a[6], src, (size_t)n * sizeof(int64_t));
    return a[6] + n;
}

// Fields: [4] src, [5] n, [6] n_free, [7] push. `TokenToKVPool.free`: check that each slot is a
// caller's (state _USED) and listed once, then release it. Returns the new free count, or
// -(1 + index of the first bad slot) with nothing changed.
int64_t rkv_free(const int64_t* a) {
    const Pool& p = pool_of(a);
    const int64_t bad = check(p, reinterpret_cast<const int64_t*>(a[4]), a[5], 1, 1);
    if (bad) return -bad;
    return rkv_release(a);  // n distinct slots that were in use: the stack has room
}

// Fields: [4] out, [5] n, [6] n_free, [7] set_to. Pop n slots off the free stack into out, top
// first (as the reference's reversed slice), and mark them set_to. The caller checked
// n <= n_free. Returns the new free count.
int64_t rkv_alloc(const int64_t* a) {
    const Pool& p = pool_of(a);
    int64_t* out = reinterpret_cast<int64_t*>(a[4]);
    const int64_t n = a[5];
    const int64_t* top = p.stack + a[6] - 1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = top[-i];
        out[i] = s;
        p.state[s] = (uint8_t)a[7];
    }
    return a[6] - n;
}

// Number of leading int32 tokens on which x[0:n] and y[0:n] agree (the tree's split point).
int64_t rkv_mismatch(const char* x, const char* y, int64_t n) {
    const int32_t* a = reinterpret_cast<const int32_t*>(x);
    const int32_t* b = reinterpret_cast<const int32_t*>(y);
    int64_t i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return i;
}

}  // extern "C"
