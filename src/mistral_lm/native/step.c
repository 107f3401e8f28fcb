/* One decode step of every decoder layer in a single call (see step.py).
 *
 * A decode step of a small model is a few hundred tiny kernels; from Python each costs a dispatch
 * and tensor bookkeeping that, summed, exceed the arithmetic. Here the layers run as a C loop over
 * the project's own kernels, reached through function pointers handed over by step.py (ggml.c's
 * quantize and matmul, dense.c's bfloat16 and int8 linears, nf4.c's NF4/FP4 matmul, attention.c's RMSNorm,
 * attention and SiLU product), so every number is computed by the same code in the same order as
 * when the layer runs from Python: the fused step equals the module path bit for bit.
 *
 * Two activation types. float32 (a GGUF model on its blocks: activations quantized to q8 per
 * linear input); bfloat16 (a bfloat16 model, or int8 / NF4 / FP4 weights computing in bfloat16: every
 * tensor between two kernels is bfloat16, as in the modules). What is done here itself is exact
 * elementwise arithmetic, with the roundings the modules perform:
 *
 *   rope   y[j] = x[j] * cos[j] + x[(j + D/2) % D] * sin[j] in float32 (sin with the signs folded
 *          in; no fma: two products and a sum, each rounded, as rope.rotate), rounded to the
 *          activation type
 *   add    the residuals, x + y rounded to the activation type
 *   gather Q/K outputs in llama.cpp's stored row order -> head order (a copy)
 *
 * Per layer, for the M rows (one token each, row m at its own position):
 *   xn = rmsnorm(x); q, k, v = xn W^T; q, k = rope(q, k); cache[slot] = k, v;
 *   a = attention(q, cache keys 0..used-1, mask); x += a Wo^T;
 *   xn = rmsnorm(x); x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
 * then the model's final norm, and where a head is given (one token per row) logits = xn Wh^T,
 * each thread its share of the vocabulary's rows.
 *
 * A step may also read T > 1 tokens per cache row (a short prompt's prefill): row m is token
 * m % T of cache row m / T and writes slot `slot + m % T`. Every row's keys are written before
 * any row attends, so a token sees the chunk's earlier tokens through the cache, as the modules'
 * write-then-read step does.
 */
#pragma GCC optimize("fp-contract=off")
#include "float_common.h"
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef SPINS
#define SPINS 2000 /* pauses before sleeping at a barrier (bench/RESULTS.md) */
#endif

typedef void (*quantize_fn)(const float *, int64_t, int64_t, int64_t, void *, int);
typedef int (*matmul_fn)(int, const void *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, float *, int64_t,
                         int);
typedef int (*attention_fn)(const void *, const void *, const void *, const uint8_t *, const int64_t *,
                            const int64_t *, float, void *, int);
typedef void (*rmsnorm_fn)(const void *, int64_t, int64_t, int64_t, const void *, float, void *, int);
typedef void (*silu_mul_fn)(const void *, int64_t, const void *, int64_t, int64_t, int64_t, void *, int);
typedef int (*bf16_linear_fn)(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, int64_t,
                              uint16_t *, int64_t, int);
typedef int (*int8_linear_fn)(const uint16_t *, int64_t, int64_t, int64_t, const int8_t *, int64_t, int64_t,
                              const uint16_t *, uint16_t *, int64_t, int);
typedef int (*attention_parts_fn)(int, int64_t);
typedef int64_t (*part_keys_fn)(const uint8_t *, int64_t, int64_t, int32_t *);
typedef void (*part_scores_fn)(int, const float *const *, int, const void *, int64_t, const int32_t *, int64_t, int64_t,
                               float, float *const *);
typedef float (*part_softmax_fn)(float *, int64_t);
typedef void (*part_weighted_fn)(int, const float *const *, const float *, int, const void *, int64_t, const int32_t *,
                                 int64_t, int64_t, float *const *);
typedef int (*nf4_mm_fn)(const void *, int, const uint8_t *, const float *, const float *, void *, int, int64_t,
                         int64_t, int64_t, int, int);

/* One activation type's elementwise kernels (attention.c's float32 or bfloat16 entry points). */
typedef struct {
    attention_fn attention;
    rmsnorm_fn rmsnorm;
    silu_mul_fn silu_mul;
} Elementwise;

typedef struct {
    quantize_fn quantize;
    matmul_fn matmul;
    bf16_linear_fn bf16_linear;
    int8_linear_fn int8_linear;
    nf4_mm_fn nf4_mm;
    Elementwise f32, bf16;
    int64_t xblock_bytes; /* one q8-quantized 32-block of activations */
    attention_fn attention_kv16[2]; /* float32 queries and output over a bfloat16 / float16 KV cache */
    /* the grouped decode attention in pieces (float32 queries; keys and values float32, bfloat16 or
     * float16), so every thread takes a share of every key/value head: NULL where missing */
    attention_parts_fn attention_parts;
    part_keys_fn part_keys;
    part_scores_fn part_scores;
    part_softmax_fn part_softmax;
    part_weighted_fn part_weighted;
} Kernels;

enum { LIN_GGML = 0, LIN_BF16 = 1, LIN_NF4 = 2, LIN_INT8 = 3 };

typedef struct {
    int64_t kind, type, n, k, ldw; /* LIN_*, ggml type, out and in features, bytes per stored row */
    const uint8_t *w;              /* GGUF blocks, bfloat16 rows, NF4 nibbles (N, K/2) or int8 rows */
    const int64_t *order;          /* output i is stored row order[i]; NULL: in order */
    const float *absmax, *codebook; /* NF4: (N, K / blocksize) scales and the 16 code values */
    int64_t blocksize;
    const uint16_t *scale;         /* int8: the (N,) bfloat16 row scales */
} Lin;

typedef struct {
    const void *ln1, *ln2; /* norm weights in the activation type */
    float eps1, eps2;
    Lin q, k, v, o, gate, up, down;
} Layer;

typedef struct {
    int64_t M, C, H, Hkv, D, F;      /* rows, hidden, heads, kv heads, head dim, intermediate */
    int64_t bf16;                    /* activation type: 0 float32, 1 bfloat16 */
    int64_t kv16;                    /* under float32 activations, the cache holds 0 float32, 1 bfloat16,
                                        2 float16 */
    float scale;                     /* attention scale */
    const float *cos, *sin;          /* (M, D) float32, sin signed */
    const uint8_t *mask;             /* (M / T, T, used) with strides mask_s[0] (cache row), mask_q below
                                        (token), mask_s[1] (key) */
    int64_t mask_s[2];
    int64_t used, slot;              /* keys attended (cache slots 0..used-1), the slot written */
    void *const *keys, *const *values; /* per layer: (M / T, Hkv, slots, D) cache buffers, activation type
                                          (16-bit with kv16) */
    int64_t cache_s[3];              /* their strides in elements: row, head, slot (unit along D) */
    int nthreads;
    int64_t waited_ns, wall_ns;      /* out: ns the threads waited for a CPU (summed; -1: unknown, or one
                                        thread) and the step's ns */
    const void *norm;                /* the model's final RMSNorm weight (C,) in the activation type, or
                                        NULL: then x is left as the last layer wrote it */
    float norm_eps;
    void *normed;                    /* (M, C) out: rmsnorm(x), where norm is given */
    int64_t T;                       /* tokens per cache row (1 for a decode step): row m is token m % T
                                        of cache row m / T, written at slot + m % T */
    int64_t mask_q;                  /* the mask's stride between one cache row's tokens */
    const Lin *head;                 /* the model's output projection on the final norm, or NULL (needs norm) */
    void *logits;                    /* (M, head->n) out in the activation type, where head is given */
} Step;

/* where row m's keys live, and its mask row */
static inline int64_t cache_row(const Step *st, int64_t m) { return m / st->T * st->cache_s[0]; }
static inline const uint8_t *mask_row(const Step *st, int64_t m) {
    return st->mask + m / st->T * st->mask_s[0] + m % st->T * st->mask_q;
}

/* The step's barrier. libgomp's own sleeps almost at once as soon as its process has more OpenMP
 * threads than CPUs (any second thread that ever ran a parallel region counts, e.g. a server's
 * engine thread beside the main thread), and a futex wake-up per barrier made a step twice as
 * slow. This one spins a little (a partner that is running arrives within microseconds), then
 * sleeps on a futex until the last thread in wakes it: on a machine busy with other work, a
 * spinner would hold a CPU its own partner is queued for. */
#if defined(__linux__)
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
static void futex_wait(atomic_int *addr, int value) {
    syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}
static void futex_wake(atomic_int *addr) { syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0); }
#else
static void futex_wait(atomic_int *addr, int value) {
    (void)addr;
    (void)value;
    sched_yield();
}
static void futex_wake(atomic_int *addr) { (void)addr; }
#endif

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

typedef struct {
    atomic_int count, phase, sleepers;
} Barrier;

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* How long this thread has waited, runnable, for a CPU (the kernel's schedstat run_delay): the
 * mark of a machine with fewer free cores than threads, which waiting on a disk or at a barrier
 * is not. -1 where it cannot be read. Opened each time: a kept descriptor per thread would leak
 * with every thread pool that ends. */
static int64_t run_delay_ns(void) {
#if defined(__linux__)
    const int fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    char text[96];
    const ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) return -1;
    text[n] = 0;
    char *end;
    strtoull(text, &end, 10); /* time on the CPU, then the time waiting for it */
    return (int64_t)strtoull(end, NULL, 10);
#else
    return -1;
#endif
}

static void barrier_wait(Barrier *b, int n) {
    if (n == 1) return;
    const int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->count, 1) == n - 1) {
        atomic_store(&b->count, 0);
        atomic_fetch_add(&b->phase, 1);
        if (atomic_load(&b->sleepers)) futex_wake(&b->phase);
        return;
    }
    for (int spins = 0; spins < SPINS && atomic_load(&b->phase) == phase; spins++) cpu_relax();
    while (atomic_load(&b->phase) == phase) {
        atomic_fetch_add(&b->sleepers, 1);
        futex_wait(&b->phase, phase); /* returns at once if the phase has moved on already */
        atomic_fetch_sub(&b->sleepers, 1);
    }
}

/* ------------------------------------------------------------------ activations, either type */
static inline float load(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* ------------------------------------------------------------------ pieces */
/* rows [n0, n1) of out (M, N) = x . W^T, on this thread alone; no kernel's output depends on
 * which rows share its call, so the split changes no bit. `x` is the q8 blocks for LIN_GGML,
 * else the bfloat16 activations (M, K). */
static int linear_rows(const Kernels *kn, const Lin *l, const void *x, int64_t M, void *out, int64_t n0, int64_t n1) {
    if (n1 <= n0) return 0;
    const uint8_t *w = l->w + n0 * l->ldw;
    if (l->kind == LIN_GGML)
        return kn->matmul((int)l->type, x, M, l->k, w, n1 - n0, l->ldw, (float *)out + n0, l->n, 1);
    if (l->kind == LIN_BF16)
        return kn->bf16_linear(x, M, l->k, l->k, (const uint16_t *)w, n1 - n0, l->ldw / 2, (uint16_t *)out + n0, l->n,
                               1);
    if (l->kind == LIN_INT8)
        return kn->int8_linear(x, M, l->k, l->k, (const int8_t *)w, n1 - n0, l->ldw, l->scale + n0, (uint16_t *)out + n0,
                               l->n, 1);
    int rc = 0; /* NF4: the kernel writes (M, N) rows contiguously, so a slice goes row by row */
    const float *absmax = l->absmax + n0 * (l->k / l->blocksize);
    for (int64_t m = 0; m < M; m++)
        rc |= kn->nf4_mm((const uint16_t *)x + m * l->k, 1, w, absmax, l->codebook, (uint16_t *)out + m * l->n + n0,
                         1, 1, n1 - n0, l->k, (int)l->blocksize, 1);
    return rc;
}

/* ------------------------------------------------------------------ products shared among threads
 * A phase's products are cut into units of 16 output rows (the kernels' tile) laid end to end over
 * its linears. Each thread starts with an even, contiguous share and walks it from the front a few
 * units at a time, so its stream of weights stays in address order (the kernels' prefetch runs on
 * into the next unit); a thread done with its own share takes the back half of the fullest other
 * share. Static shares left the threads waiting at the phase's barrier whenever one of them ran
 * slower (bench/RESULTS.md). A share is one 64-bit word, first unit | end << 32, changed only by
 * compare-and-swap: a unit goes to exactly one thread, and which thread changes no bit. */
typedef struct {
    _Alignas(64) _Atomic uint64_t range;
} Share;

#define UNITS_A_CLAIM 4 /* units a thread takes from its own share at a time */

static inline uint64_t span(uint64_t lo, uint64_t hi) { return lo | hi << 32; }

/* thread t's first share of a phase of `units` among nt */
static void share_init(Share *sh, int64_t units, int t, int nt) {
    atomic_store(&sh[t].range, span((uint64_t)(units * t / nt), (uint64_t)(units * (t + 1) / nt)));
}

/* The next units [*u0, *u1) thread t computes in this phase; 0 when none is left anywhere. */
static int claim(Share *sh, int t, int nt, int64_t *u0, int64_t *u1) {
    _Atomic uint64_t *mine = &sh[t].range;
    for (;;) {
        uint64_t r = atomic_load(mine);
        while ((uint32_t)r < (uint32_t)(r >> 32)) {
            const uint64_t lo = (uint32_t)r, hi = r >> 32, end = lo + UNITS_A_CLAIM < hi ? lo + UNITS_A_CLAIM : hi;
            if (atomic_compare_exchange_weak(mine, &r, span(end, hi))) {
                *u0 = (int64_t)lo;
                *u1 = (int64_t)end;
                return 1;
            }
        }
        int victim = -1;
        uint64_t most = 0, seen = 0;
        for (int s = 0; s < nt; s++) {
            const uint64_t v = atomic_load(&sh[s].range), left = (v >> 32) - (uint32_t)v;
            if (s != t && (uint32_t)v < (uint32_t)(v >> 32) && left > most) {
                most = left;
                victim = s;
                seen = v;
            }
        }
        if (victim < 0) return 0;
        const uint64_t lo = (uint32_t)seen, hi = seen >> 32, cut = hi - (hi - lo) / 2;
        if (cut < hi && atomic_compare_exchange_strong(&sh[victim].range, &seen, span(lo, cut)))
            atomic_store(mine, span(cut, hi)); /* empty until now: no other thread writes it */
        else if (cut >= hi && atomic_compare_exchange_strong(&sh[victim].range, &seen, span(hi, hi)))
            atomic_store(mine, span(lo, hi)); /* a single unit left: take it whole */
    }
}

/* units [u0, u1) of a phase over `count` linears laid end to end (16-row units; each linear's
 * last unit may be short), linear i reading xs[i] and writing outs[i] */
static int phase_units(const Kernels *kn, const Lin *const *ls, int count, const void *const *xs, int64_t M,
                       void *const *outs, int64_t u0, int64_t u1) {
    int rc = 0;
    for (int i = 0, base = 0; i < count && u0 < u1; i++) {
        const int64_t units = (ls[i]->n + 15) / 16, a = u0 - base, b = u1 - base;
        if (a < units && b > 0) {
            const int64_t n0 = (a > 0 ? a : 0) * 16, n1 = (b < units ? b : units) * 16;
            rc |= linear_rows(kn, ls[i], xs[i], M, outs[i], n0, n1 < ls[i]->n ? n1 : ls[i]->n);
        }
        base += (int)units;
    }
    return rc;
}

static int64_t phase_size(const Lin *const *ls, int count) {
    int64_t units = 0;
    for (int i = 0; i < count; i++) units += (ls[i]->n + 15) / 16;
    return units;
}

#ifndef PREFETCH_NEXT
#define PREFETCH_NEXT 65536
#endif
/* Ask for the first PREFETCH_NEXT bytes of thread t's first share of the next phase into L2, as
 * its products end: the weights come in while the thread waits at the barrier and runs the
 * serial parts (norms, attention), when the bus would be idle (bench/RESULTS.md). */
static void prefetch_share(const Lin *const *ls, int count, int t, int nt) {
    if (PREFETCH_NEXT <= 0) return;
    const int64_t u = phase_size(ls, count) * t / nt;
    for (int i = 0, base = 0; i < count; i++) {
        const int64_t units = (ls[i]->n + 15) / 16;
        if (u < base + units) {
            const uint8_t *p = ls[i]->w + (u - base) * 16 * ls[i]->ldw, *end = ls[i]->w + ls[i]->n * ls[i]->ldw;
            const uint8_t *stop = p + PREFETCH_NEXT < end ? p + PREFETCH_NEXT : end;
            for (; p < stop; p += 64) __builtin_prefetch(p, 0, 2);
            return;
        }
        base += (int)units;
    }
}

/* this thread's part of the phase: every unit it claims */
static int run_phase(const Kernels *kn, Share *sh, const Lin *const *ls, int count, const void *const *xs, int64_t M,
                     void *const *outs, int t, int nt) {
    int rc = 0;
    int64_t u0, u1;
    while (claim(sh, t, nt, &u0, &u1)) rc |= phase_units(kn, ls, count, xs, M, outs, u0, u1);
    return rc;
}

static int run_one(const Kernels *kn, Share *sh, const Lin *l, const void *x, int64_t M, void *out, int t, int nt) {
    void *outs[1] = {out};
    return run_phase(kn, sh, &l, 1, &x, M, outs, t, nt);
}

/* The MLP's gate and up products and their SiLU product, a unit at a time: a unit's gate and up
 * rows are computed by the thread that multiplies them, so they need no barrier. */
static int run_gate_up(const Kernels *kn, const Elementwise *ew, Share *sh, const Lin *gate, const Lin *up,
                       const void *x, int64_t M, char *g, char *u, char *act, size_t es, int t, int nt) {
    const int64_t F = gate->n;
    int rc = 0;
    int64_t u0, u1;
    while (claim(sh, t, nt, &u0, &u1)) {
        const int64_t f0 = 16 * u0, f1 = 16 * u1 < F ? 16 * u1 : F;
        rc |= linear_rows(kn, gate, x, M, g, f0, f1);
        rc |= linear_rows(kn, up, x, M, u, f0, f1);
        for (int64_t m = 0; m < M; m++)
            ew->silu_mul(g + es * (m * F + f0), F, u + es * (m * F + f0), F, 1, f1 - f0, act + es * (m * F + f0), 1);
    }
    return rc;
}

/* heads [h0, h1) of row m of y (M, heads, D) = rope(gathered raw rows), in the activation type;
 * raw holds N = heads * D outputs a row, output i stored at raw index order[i] */
static void rope_heads(const void *raw, const int64_t *order, int64_t N, int64_t m, int64_t h0, int64_t h1,
                       int64_t D, const float *cos, const float *sin, int bf16, float *tmp, void *y) {
    const int64_t half = D / 2;
    const float *c = cos + m * D, *s = sin + m * D;
    for (int64_t h = h0; h < h1; h++) {
        for (int64_t j = 0; j < D; j++) tmp[j] = load(raw, m * N + (order ? order[h * D + j] : h * D + j), bf16);
        for (int64_t j = 0; j < D; j++) {
            const float a = tmp[j] * c[j];
            const float b = tmp[j < half ? j + half : j - half] * s[j]; /* (j + half) mod D, no division */
            store(y, m * N + h * D + j, a + b, bf16);
        }
    }
}

static void add(void *x, const void *y, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) store(x, i, load(x, i, bf16) + load(y, i, bf16), bf16);
}

/* What linear l reads of activations x: their q8 blocks xq for GGUF linears (written by
 * `quantize_input`), x itself for the bfloat16 kinds. */
static const void *input_of(const Lin *l, const void *x, const void *xq) { return l->kind == LIN_GGML ? xq : x; }

static void quantize_input(const Kernels *kn, const Lin *l, const void *x, int64_t M, void *xq) {
    if (l->kind == LIN_GGML) kn->quantize((const float *)x, M, l->k, l->k, xq, 1);
}

/* ------------------------------------------------------------------ attention split among threads */
#define PART_Q 4 /* heads of one key/value head a call of attention.c's pieces takes at most */

/* the heads of the block starting at h0 among heads [h0, end): PART_Q at most */
static inline int block_heads(int64_t h0, int64_t end) { return (int)(end - h0 < PART_Q ? end - h0 : PART_Q); }

/* This thread's share [j0, j1) of every (row, key/value head)'s allowed keys: their scores for
 * each of the head's queries, into `scores` (M, H, used + 16) */
static void split_scores(const Kernels *kn, int kind, const Step *st, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                         const char *keys, size_t kes, const float *q, const int32_t *idx, const int64_t *count,
                         float *scores, int t, int nt) {
    const int64_t rep = H / Hkv, row = st->used + 16;
    for (int64_t m = 0; m < M; m++) {
        const int64_t n = count[m], j0 = n * t / nt, j1 = n * (t + 1) / nt;
        if (j1 <= j0) continue;
        for (int64_t g = 0; g < Hkv; g++) {
            const char *kg = keys + kes * (size_t)(cache_row(st, m) + g * st->cache_s[1]);
            for (int64_t h0 = g * rep; h0 < (g + 1) * rep; h0 += PART_Q) {
                const int R = block_heads(h0, (g + 1) * rep);
                const float *qr[PART_Q];
                float *sr[PART_Q];
                for (int r = 0; r < R; r++) {
                    qr[r] = q + (m * H + h0 + r) * D;
                    sr[r] = scores + (m * H + h0 + r) * row + j0;
                }
                kn->part_scores(kind, qr, R, kg, st->cache_s[2], idx + m * (st->used + 1) + j0, j1 - j0, D, st->scale,
                                sr);
            }
        }
    }
}

/* This thread's lanes [d0, d1) (whole groups of 16) of every head's output: the softmax of the
 * head's scores (each thread its own copy, the same bits), then the weighted sum of its lanes */
static void split_weighted(const Kernels *kn, int kind, const Step *st, int64_t M, int64_t H, int64_t Hkv, int64_t D,
                           const char *values, size_t kes, const int32_t *idx, const int64_t *count,
                           const float *scores, float *probs, float *att, int t, int nt) {
    const int64_t rep = H / Hkv, row = st->used + 16, groups = (D + 15) / 16;
    const int64_t d0 = 16 * (groups * t / nt), end = 16 * (groups * (t + 1) / nt), d1 = end < D ? end : D;
    if (d1 <= d0) return;
    for (int64_t m = 0; m < M; m++) {
        const int64_t n = count[m];
        for (int64_t g = 0; g < Hkv; g++) {
            const char *vg = values + kes * (size_t)(cache_row(st, m) + g * st->cache_s[1] + d0);
            for (int64_t h0 = g * rep; h0 < (g + 1) * rep; h0 += PART_Q) {
                const int R = block_heads(h0, (g + 1) * rep);
                const float *pr[PART_Q];
                float *dst[PART_Q], sums[PART_Q];
                for (int r = 0; r < R; r++) {
                    dst[r] = att + (m * H + h0 + r) * D + d0;
                    if (n == 0) { /* no key allowed: zeros, as attention writes */
                        memset(dst[r], 0, sizeof(float) * (size_t)(d1 - d0));
                        continue;
                    }
                    float *p = probs + r * row;
                    memcpy(p, scores + (m * H + h0 + r) * row, sizeof(float) * (size_t)n);
                    sums[r] = kn->part_softmax(p, n);
                    pr[r] = p;
                }
                if (n > 0)
                    kn->part_weighted(kind, pr, sums, R, vg, st->cache_s[2], idx + m * (st->used + 1), n, d1 - d0,
                                      dst);
            }
        }
    }
}

/* x (M, C) in the activation type, updated in place through every layer. Returns 0, -1 for a
 * kernel's refusal, -2 when scratch memory cannot be allocated.
 *
 * One parallel region for the whole step: each thread computes the units of every projection's
 * rows it claims (run_phase), the rope and cache write of its (row, kv head) items, and either those items'
 * attention or, where attention.c's grouped kernels run (float32 activations), a share of every
 * item's keys and output lanes (split_scores, split_weighted: the same bits).
 * Starting a parallel region per kernel cost more than the kernels of a small model
 * (bench/RESULTS.md). The small serial parts (norms, activation quantization, residuals) run on
 * every thread, each on its own copy of the residual stream (the same code on the same inputs:
 * the same bits), so a thread waits only where it reads rows another thread wrote: seven
 * barriers a layer with the attention shared, five without (ten when one thread ran the serial
 * parts). */
int mlm_decode_layers(const Kernels *kn, const Layer *layers, int64_t L, Step *st, void *x) {
    const int64_t M = st->M, C = st->C, H = st->H, Hkv = st->Hkv, D = st->D, F = st->F;
    const int64_t HD = H * D, KD = Hkv * D, widest = (C > F ? C : F) > HD ? (C > F ? C : F) : HD;
    const int64_t rep = Hkv > 0 ? H / Hkv : 0;
    const int bf16 = st->bf16 != 0;
    const int kv16 = bf16 ? 0 : (int)st->kv16;
    if (kv16 < 0 || kv16 > 2) return -1;
    const size_t es = bf16 ? 2 : 4, kes = kv16 ? 2 : es; /* activation and cache element bytes */
    const Elementwise *ew = bf16 ? &kn->bf16 : &kn->f32;
    const attention_fn attend = kv16 ? kn->attention_kv16[kv16 - 1] : ew->attention;
    if (attend == NULL) return -1;
    const int threads = st->nthreads > 0 ? st->nthreads : 1;
    if (st->T < 1 || M % st->T) return -1;
    if (st->head != NULL && (st->norm == NULL || st->logits == NULL || st->head->k != C)) return -1;
    const int chunk = st->T > 1; /* the rows read each other's keys: all are written before any attends */
    /* each thread's own: the residual stream (thread 0 works in x itself), its norm, the q8 blocks
     * of a projection's input, rope's gathered head; 64-byte aligned slices */
    const size_t xq_bytes = (size_t)(M * (widest / 32 + 1) * kn->xblock_bytes);
    const size_t own_bytes = ((2 * es * (size_t)(M * C) + xq_bytes + sizeof(float) * (size_t)D) + 63) / 64 * 64;
    /* float32 activations over a cache attention's grouped kernels read: every thread takes a
     * share of every key/value head's keys (scores) and of its output lanes (the weighted sum),
     * rather than whole heads, so a step's threads stay even however few key/value heads it has */
    const int split = !bf16 && Hkv > 0 && kn->attention_parts != NULL && kn->part_keys != NULL &&
                      kn->part_scores != NULL && kn->part_softmax != NULL && kn->part_weighted != NULL &&
                      kn->attention_parts(kv16, rep);
    const int64_t row = st->used + 16; /* a head's scores, padded for the softmax's vector loads */
    /* each thread's own for the split attention: every row's allowed keys (the mask is the same for
     * every layer), their counts, and up to PART_Q heads' probabilities */
    const size_t part_bytes = split ? ((sizeof(int32_t) * (size_t)(M * (st->used + 1)) + sizeof(int64_t) * (size_t)M +
                                        sizeof(float) * PART_Q * (size_t)row) + 63) / 64 * 64 : 0;
    char *buf = malloc(es * (size_t)(M * (C + 3 * HD + 3 * KD + 3 * F)));
    char *own = aligned_alloc(64, (own_bytes + part_bytes) * (size_t)threads);
    float *scores = split ? malloc(sizeof(float) * (size_t)(M * H * row)) : NULL;
    const int64_t phases = 4 * L + 1; /* per layer q/k/v, o, gate/up, down; then the head */
    Share *shares = aligned_alloc(64, sizeof(Share) * (size_t)(phases * threads));
    if (buf == NULL || own == NULL || shares == NULL || (split && scores == NULL) || Hkv <= 0 || H % Hkv) {
        const int nomem = buf == NULL || own == NULL || shares == NULL || (split && scores == NULL);
        free(buf);
        free(own);
        free(shares);
        free(scores);
        return nomem ? -2 : -1;
    }
    memset(shares, 0, sizeof(Share) * (size_t)(phases * threads));
    char *o = buf, *qraw = o + es * M * C, *q = qraw + es * M * HD, *att = q + es * M * HD;
    char *kraw = att + es * M * HD, *k = kraw + es * M * KD, *v = k + es * M * KD, *gate = v + es * M * KD;
    char *up = gate + es * M * F, *act = up + es * M * F;
    int rc = 0;
    /* one (row, kv head) item: q (1, rep, 1, D), its keys and values (1, 1, used, D), mask (1, 1, 1, used) */
    const int64_t shape[6] = {1, rep, 1, 1, st->used, D};
    const int64_t strides[12] = {HD, D, D, st->cache_s[0], st->cache_s[1], st->cache_s[2],
                                 st->cache_s[0], st->cache_s[1], st->cache_s[2], st->mask_s[0], 0, st->mask_s[1]};
    Barrier bar = {0, 0, 0};
    atomic_llong waited_ns = 0;
    atomic_int unknown = 0;
    const int64_t start = now_ns();
#pragma omp parallel num_threads(threads) reduction(| : rc)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t delay0 = nt > 1 ? run_delay_ns() : -1; /* one thread waits for no partner: not read */
        char *mine = own + (own_bytes + part_bytes) * (size_t)t;
        char *xt = t == 0 ? (char *)x : mine, *xn = mine + es * M * C, *xq = xn + es * M * C;
        float *tmp = (float *)(xq + xq_bytes);
        int32_t *idx = (int32_t *)(mine + own_bytes);
        int64_t *count = (int64_t *)(idx + M * (st->used + 1));
        float *probs = (float *)(count + M);
        if (t != 0) memcpy(xt, x, es * (size_t)(M * C)); /* before the first barrier: x is still the input */
        for (int64_t li = 0; li < L; li++) { /* a share another thread reads before it is set looks empty */
            const Layer *ly = layers + li;
            const Lin *qkv[3] = {&ly->q, &ly->k, &ly->v};
            share_init(shares + (4 * li) * nt, phase_size(qkv, 3), t, nt);
            share_init(shares + (4 * li + 1) * nt, (ly->o.n + 15) / 16, t, nt);
            share_init(shares + (4 * li + 2) * nt, (ly->gate.n + 15) / 16, t, nt);
            share_init(shares + (4 * li + 3) * nt, (ly->down.n + 15) / 16, t, nt);
        }
        if (st->head != NULL) share_init(shares + 4 * L * nt, (st->head->n + 15) / 16, t, nt);
        for (int64_t m = 0; m < M && split; m++)
            count[m] = kn->part_keys(mask_row(st, m), st->mask_s[1], st->used, idx + m * (st->used + 1));
        for (int64_t li = 0; li < L; li++) {
            const Layer *ly = layers + li;
            char *keys = st->keys[li], *values = st->values[li];
            /* attention block */
            ew->rmsnorm(xt, M, C, C, ly->ln1, ly->eps1, xn, 1);
            quantize_input(kn, &ly->q, xn, M, xq); /* q, k and v read the same blocks */
            {
                const Lin *qkv[3] = {&ly->q, &ly->k, &ly->v};
                const void *in[3] = {input_of(&ly->q, xn, xq), input_of(&ly->k, xn, xq), input_of(&ly->v, xn, xq)};
                void *outs[3] = {qraw, kraw, v};
                rc |= run_phase(kn, shares + (4 * li) * nt, qkv, 3, in, M, outs, t, nt);
                const Lin *next = &ly->o;
                prefetch_share(&next, 1, t, nt);
            }
            barrier_wait(&bar, nt);
            for (int64_t it = t; it < M * Hkv; it += nt) {
                const int64_t m = it / Hkv, g = it % Hkv, cache_at = cache_row(st, m) + g * st->cache_s[1];
                rope_heads(qraw, ly->q.order, HD, m, g * rep, (g + 1) * rep, D, st->cos, st->sin, bf16, tmp, q);
                rope_heads(kraw, ly->k.order, KD, m, g, g + 1, D, st->cos, st->sin, bf16, tmp, k);
                const int64_t at = cache_at + (st->slot + m % st->T) * st->cache_s[2];
                if (kv16) { /* rounded as the cache's `.to(bfloat16 / float16)` rounds */
                    const float *kr = (const float *)k + (m * Hkv + g) * D, *vr = (const float *)v + (m * Hkv + g) * D;
                    uint16_t *kd = (uint16_t *)keys + at, *vd = (uint16_t *)values + at;
                    for (int64_t j = 0; j < D; j++) {
                        kd[j] = kv16 == 2 ? f32_to_f16(kr[j]) : f32_to_bf16(kr[j]);
                        vd[j] = kv16 == 2 ? f32_to_f16(vr[j]) : f32_to_bf16(vr[j]);
                    }
                } else {
                    memcpy(keys + es * at, k + es * (m * Hkv + g) * D, es * (size_t)D);
                    memcpy(values + es * at, v + es * (m * Hkv + g) * D, es * (size_t)D);
                }
                if (!split && !chunk)
                    rc |= attend(q + es * (m * H + g * rep) * D, keys + kes * cache_at, values + kes * cache_at,
                                 mask_row(st, m), shape, strides, st->scale, att + es * (m * H + g * rep) * D, 1);
            }
            if (!split && chunk) {
                barrier_wait(&bar, nt); /* the chunk's keys and values all in the cache */
                for (int64_t it = t; it < M * Hkv; it += nt) {
                    const int64_t m = it / Hkv, g = it % Hkv, cache_at = cache_row(st, m) + g * st->cache_s[1];
                    rc |= attend(q + es * (m * H + g * rep) * D, keys + kes * cache_at, values + kes * cache_at,
                                 mask_row(st, m), shape, strides, st->scale, att + es * (m * H + g * rep) * D, 1);
                }
            }
            if (split) {
                barrier_wait(&bar, nt); /* every query roped, every new key and value in the cache */
                split_scores(kn, kv16, st, M, H, Hkv, D, keys, kes, (const float *)q, idx, count, scores, t, nt);
                barrier_wait(&bar, nt);
                split_weighted(kn, kv16, st, M, H, Hkv, D, values, kes, idx, count, scores, probs, (float *)att, t,
                               nt);
            }
            barrier_wait(&bar, nt);
            quantize_input(kn, &ly->o, att, M, xq);
            rc |= run_one(kn, shares + (4 * li + 1) * nt, &ly->o, input_of(&ly->o, att, xq), M, o, t, nt);
            {
                const Lin *next = &ly->gate;
                prefetch_share(&next, 1, t, nt);
            }
            barrier_wait(&bar, nt);
            /* MLP block */
            add(xt, o, M * C, bf16);
            ew->rmsnorm(xt, M, C, C, ly->ln2, ly->eps2, xn, 1);
            quantize_input(kn, &ly->gate, xn, M, xq);
            rc |= run_gate_up(kn, ew, shares + (4 * li + 2) * nt, &ly->gate, &ly->up, input_of(&ly->gate, xn, xq), M,
                              gate, up, act, es, t, nt);
            {
                const Lin *next = &ly->down;
                prefetch_share(&next, 1, t, nt);
            }
            barrier_wait(&bar, nt);
            quantize_input(kn, &ly->down, act, M, xq);
            rc |= run_one(kn, shares + (4 * li + 3) * nt, &ly->down, input_of(&ly->down, act, xq), M, o, t, nt);
            if (li + 1 < L) {
                const Lin *next[3] = {&layers[li + 1].q, &layers[li + 1].k, &layers[li + 1].v};
                prefetch_share(next, 3, t, nt);
            } else if (st->head != NULL) {
                prefetch_share(&st->head, 1, t, nt);
            }
            barrier_wait(&bar, nt);
            add(xt, o, M * C, bf16); /* o is next written after the next layer's attention barrier */
        }
        if (st->head != NULL) { /* the head: every thread norms its own residual copy (the same bits),
                                   then takes its share of the vocabulary's rows */
            ew->rmsnorm(xt, M, C, C, st->norm, st->norm_eps, xn, 1);
            quantize_input(kn, st->head, xn, M, xq);
            rc |= run_one(kn, shares + 4 * L * nt, st->head, input_of(st->head, xn, xq), M, st->logits, t, nt);
        }
        const int64_t delay1 = delay0 < 0 ? -1 : run_delay_ns();
        if (delay1 < 0) atomic_store(&unknown, 1);
        else atomic_fetch_add(&waited_ns, delay1 - delay0);
    }
    st->wall_ns = now_ns() - start;
    st->waited_ns = atomic_load(&unknown) ? -1 : atomic_load(&waited_ns);
    if (rc == 0 && st->norm != NULL) /* the final norm: one call fewer from Python a token */
        ew->rmsnorm(x, M, C, C, st->norm, st->norm_eps, st->normed, 1);
    free(buf);
    free(own);
    free(shares);
    free(scores);
    return rc == 0 ? 0 : rc == -2 ? -2 : -1;
}
