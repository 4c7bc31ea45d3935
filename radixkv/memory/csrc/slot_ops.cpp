// Slot allocator hot path of radixkv.memory.kv_pool, called through ctypes (radixkv/memory/native.py).
//
// Each call does in one pass what the numpy reference (kv_pool.py) does with a handful of
// vectorised calls: validate a batch of slots against the per-slot state array and change their
// state, push or pop the free stack. Every function validates everything before it writes
// anything, so a failed call leaves the pool exactly as it was (the Python side then names the
// offending slot with the reference's messages).
//
// Conventions: `state` has num_slots + 1 bytes (slot 0 reserved), `stack` num_slots int64
// entries whose first `n_free` are the free slots (top = end), `stamp` num_slots + 1 int64
// entries used to find repeats: a slot seen in this call carries the call's `gen`.

#include <cstdint>

extern "C" {

// Check that every slot is in 1..num_slots, in state `want` and (when stamp is non-null) listed
// once; then set all of them to `set_to`. Returns 0, or 1 + the index of the first bad slot
// (nothing is changed then).
int64_t rkv_check_set(const int64_t* slots, int64_t n, uint8_t* state, int64_t num_slots,
                      int64_t* stamp, int64_t gen, int64_t want, int64_t set_to) {
    const uint64_t limit = (uint64_t)num_slots;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = slots[i];
        if ((uint64_t)(s - 1) >= limit || state[s] != (uint8_t)want) return i + 1;
        if (stamp) {
            if (stamp[s] == gen) return i + 1;
            stamp[s] = gen;
        }
    }
    if (set_to != want)
        for (int64_t i = 0; i < n; ++i) state[slots[i]] = (uint8_t)set_to;
    return 0;
}

// Mark slots free (they are known valid and distinct) and, with push, put them on the free
// stack. Returns the new free count.
int64_t rkv_release(const int64_t* slots, int64_t n, uint8_t* state, int64_t* stack,
                    int64_t n_free, int64_t push) {
    for (int64_t i = 0; i < n; ++i) state[slots[i]] = 0;
    if (!push) return n_free;
    int64_t* top = stack + n_free;
    for (int64_t i = 0; i < n; ++i) top[i] = slots[i];
    return n_free + n;
}

// Validate (in state `want`, listed once) then free and push, in one call: `TokenToKVPool.free`.
// Returns the new free count, or -(1 + index of the first bad slot) with nothing changed.
int64_t rkv_free(const int64_t* slots, int64_t n, uint8_t* state, int64_t num_slots,
                 int64_t* stamp, int64_t gen, int64_t want, int64_t* stack, int64_t n_free,
                 int64_t push) {
    const int64_t bad = rkv_check_set(slots, n, state, num_slots, stamp, gen, want, want);
    if (bad) return -bad;
    return rkv_release(slots, n, state, stack, n_free, push);
}

// Pop n slots off the free stack into out (top first, as the reference's reversed slice) and
// mark them `set_to`. The caller checked n <= n_free. Returns the new free count.
int64_t rkv_alloc(int64_t* out, int64_t n, uint8_t* state, int64_t* stack, int64_t n_free,
                  int64_t set_to) {
    const int64_t* top = stack + n_free - 1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t s = top[-i];
        out[i] = s;
        state[s] = (uint8_t)set_to;
    }
    return n_free - n;
}

// rkv_check_set on `src`, then (only if it passed) copy the n slots to `out`: adopting a run of
// an insert's slots and handing back the tree's own copy in one call. out may equal src.
int64_t rkv_take(const int64_t* src, int64_t n, int64_t* out, uint8_t* state, int64_t num_slots,
                 int64_t* stamp, int64_t gen, int64_t want, int64_t set_to) {
    const int64_t bad = rkv_check_set(src, n, state, num_slots, stamp, gen, want, set_to);
    if (bad || out == src) return bad;
    for (int64_t i = 0; i < n; ++i) out[i] = src[i];
    return 0;
}

int64_t rkv_slot_ops_version() { return 1; }

}  // extern "C"
