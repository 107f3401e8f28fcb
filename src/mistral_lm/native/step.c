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
    const uint8_t *mask;             /* (M, used) with strides mask_s[0] (row), mask_s[1] (key) */
    int64_t mask_s[2];
    int64_t used, slot;              /* keys attended (cache slots 0..used-1), the slot written */
    void *const *keys, *const *values; /* per layer: (M, Hkv, slots, D) cache buffers, activation type
                                          (16-bit with kv16) */
    int64_t cache_s[3];              /* their strides in elements: row, head, slot (unit along D) */
    int nthreads;
    int64_t waited_ns, wall_ns;      /* out: ns the threads waited for a CPU (summed; -1: unknown, or one
                                        thread) and the step's ns */
} Step;

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
/* this thread's share [n0, n1) of N outputs, in whole 16-row tiles (the kernels' unit) */
static void share(int64_t N, int t, int nt, int64_t *n0, int64_t *n1) {
    const int64_t tiles = (N + 15) / 16;
    *n0 = tiles * t / nt * 16;
    *n1 = tiles * (t + 1) / nt * 16;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}

/* rows [n0, n1) of out (M, N) = x . W^T, on this thread alone; no kernel's output depends on
 * which rows share its call, so the split changes no bit. `x` is the q8 blocks for LIN_GGML,
 * else the bfloat16 activations (M, K). */
static int linear_part(const Kernels *kn, const Lin *l, const void *x, int64_t M, void *out, int t, int nt) {
    int64_t n0, n1;
    share(l->n, t, nt, &n0, &n1);
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

/* y (M, heads, D) = rope(gathered raw rows), in the activation type */
static void rope(const void *raw, const int64_t *order, int64_t M, int64_t heads, int64_t D, const float *cos,
                 const float *sin, int bf16, float *tmp, void *y) {
    const int64_t N = heads * D, half = D / 2;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t i = 0; i < N; i++) tmp[i] = load(raw, m * N + (order ? order[i] : i), bf16);
        const float *c = cos + m * D, *s = sin + m * D;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = tmp + h * D;
            for (int64_t j = 0; j < D; j++) {
                const float a = xh[j] * c[j];
                const float b = xh[(j + half) % D] * s[j];
                store(y, m * N + h * D + j, a + b, bf16);
            }
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

/* x (M, C) in the activation type, updated in place through every layer. Returns 0, -1 for a
 * kernel's refusal, -2 when scratch memory cannot be allocated.
 *
 * One parallel region for the whole step: each thread computes its share of every projection's
 * rows and of the attention's (row, kv head) items; the small serial parts (norms, activation
 * quantization, rope, residuals) run on one thread between barriers. Starting a parallel region
 * per kernel cost more than the kernels of a small model (bench/RESULTS.md). */
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
    char *buf = malloc(es * (size_t)(M * (2 * C + 3 * HD + 3 * KD + 3 * F)));
    float *tmp = malloc(sizeof(float) * (size_t)HD);
    void *xq = malloc((size_t)(M * (widest / 32 + 1) * kn->xblock_bytes));
    if (buf == NULL || tmp == NULL || xq == NULL || Hkv <= 0 || H % Hkv) {
        const int nomem = buf == NULL || tmp == NULL || xq == NULL;
        free(buf);
        free(tmp);
        free(xq);
        return nomem ? -2 : -1;
    }
    char *xn = buf, *o = xn + es * M * C, *qraw = o + es * M * C, *q = qraw + es * M * HD, *att = q + es * M * HD;
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
#pragma omp parallel num_threads(st->nthreads) reduction(| : rc)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t delay0 = nt > 1 ? run_delay_ns() : -1; /* one thread waits for no partner: not read */
        for (int64_t li = 0; li < L; li++) {
            const Layer *ly = layers + li;
            char *keys = st->keys[li], *values = st->values[li];
            /* attention block */
            if (t == 0) {
                ew->rmsnorm(x, M, C, C, ly->ln1, ly->eps1, xn, 1);
                quantize_input(kn, &ly->q, xn, M, xq);
            }
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->q, input_of(&ly->q, xn, xq), M, qraw, t, nt);
            rc |= linear_part(kn, &ly->k, input_of(&ly->k, xn, xq), M, kraw, t, nt);
            rc |= linear_part(kn, &ly->v, input_of(&ly->v, xn, xq), M, v, t, nt);
            barrier_wait(&bar, nt);
            if (t == 0) {
                rope(qraw, ly->q.order, M, H, D, st->cos, st->sin, bf16, tmp, q);
                rope(kraw, ly->k.order, M, Hkv, D, st->cos, st->sin, bf16, tmp, k);
                for (int64_t m = 0; m < M; m++)
                    for (int64_t g = 0; g < Hkv; g++) {
                        const int64_t at = m * st->cache_s[0] + g * st->cache_s[1] + st->slot * st->cache_s[2];
                        if (kv16) { /* rounded as the cache's `.to(bfloat16 / float16)` rounds */
                            const float *kr = (const float *)k + (m * Hkv + g) * D, *vr = (const float *)v + (m * Hkv + g) * D;
                            uint16_t *kd = (uint16_t *)keys + at, *vd = (uint16_t *)values + at;
                            for (int64_t j = 0; j < D; j++) {
                                kd[j] = kv16 == 2 ? f32_to_f16(kr[j]) : f32_to_bf16(kr[j]);
                                vd[j] = kv16 == 2 ? f32_to_f16(vr[j]) : f32_to_bf16(vr[j]);
                            }
                            continue;
                        }
                        memcpy(keys + es * at, k + es * (m * Hkv + g) * D, es * (size_t)D);
                        memcpy(values + es * at, v + es * (m * Hkv + g) * D, es * (size_t)D);
                    }
            }
            barrier_wait(&bar, nt);
            for (int64_t it = t; it < M * Hkv; it += nt) {
                const int64_t m = it / Hkv, g = it % Hkv, cache_at = m * st->cache_s[0] + g * st->cache_s[1];
                rc |= attend(q + es * (m * H + g * rep) * D, keys + kes * cache_at, values + kes * cache_at,
                                    st->mask + m * st->mask_s[0], shape, strides, st->scale,
                                    att + es * (m * H + g * rep) * D, 1);
            }
            barrier_wait(&bar, nt);
            if (ly->o.kind == LIN_GGML) { /* the same kind on every thread: all take this barrier or none */
                if (t == 0) quantize_input(kn, &ly->o, att, M, xq);
                barrier_wait(&bar, nt);
            }
            rc |= linear_part(kn, &ly->o, input_of(&ly->o, att, xq), M, o, t, nt);
            barrier_wait(&bar, nt);
            /* MLP block */
            if (t == 0) {
                add(x, o, M * C, bf16);
                ew->rmsnorm(x, M, C, C, ly->ln2, ly->eps2, xn, 1);
                quantize_input(kn, &ly->gate, xn, M, xq);
            }
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->gate, input_of(&ly->gate, xn, xq), M, gate, t, nt);
            rc |= linear_part(kn, &ly->up, input_of(&ly->up, xn, xq), M, up, t, nt);
            {   /* this thread's gate and up rows are its own: their product needs no barrier */
                int64_t f0, f1;
                share(F, t, nt, &f0, &f1);
                for (int64_t m = 0; m < M && f1 > f0; m++)
                    ew->silu_mul(gate + es * (m * F + f0), F, up + es * (m * F + f0), F, 1, f1 - f0,
                                 act + es * (m * F + f0), 1);
            }
            barrier_wait(&bar, nt);
            if (ly->down.kind == LIN_GGML) {
                if (t == 0) quantize_input(kn, &ly->down, act, M, xq);
                barrier_wait(&bar, nt);
            }
            rc |= linear_part(kn, &ly->down, input_of(&ly->down, act, xq), M, o, t, nt);
            barrier_wait(&bar, nt);
            if (t == 0) add(x, o, M * C, bf16); /* the next layer's first barrier follows its norm, on thread 0 too */
        }
        const int64_t delay1 = delay0 < 0 ? -1 : run_delay_ns();
        if (delay1 < 0) atomic_store(&unknown, 1);
        else atomic_fetch_add(&waited_ns, delay1 - delay0);
    }
    st->wall_ns = now_ns() - start;
    st->waited_ns = atomic_load(&unknown) ? -1 : atomic_load(&waited_ns);
    free(buf);
    free(tmp);
    free(xq);
    return rc == 0 ? 0 : rc == -2 ? -2 : -1;
}
