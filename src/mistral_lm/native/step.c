/* One decode step of every decoder layer in a single call (see step.py).
 *
 * A decode step of a small model is a few hundred tiny kernels; from Python each costs a dispatch
 * and tensor bookkeeping that, summed, exceed the arithmetic. Here the layers run as a C loop over
 * the project's own kernels, reached through function pointers handed over by step.py (ggml.c's
 * quantize and matmul, attention.c's RMSNorm, attention and SiLU product), so every number is
 * computed by the same code in the same order as when the layer runs from Python: the fused step
 * equals the module path bit for bit. What is done here itself is exact elementwise float32:
 *
 *   rope   y[j] = x[j] * cos[j] + x[(j + D/2) % D] * sin[j]   (sin with the signs folded in; no fma,
 *          as rope.rotate computes it: two products and a sum, each rounded)
 *   add    the residuals, one rounding each
 *   gather Q/K outputs in llama.cpp's stored row order -> head order (a copy)
 *
 * Per layer, for the M rows (one token each, row m at its own position):
 *   xn = rmsnorm(x); q, k, v = xn W^T (activations quantized once); q, k = rope(q, k);
 *   cache[slot] = k, v; a = attention(q, cache keys 0..used-1, mask); x += a Wo^T;
 *   xn = rmsnorm(x); x += (silu(xn Wg^T) * (xn Wu^T)) Wd^T
 */
#pragma GCC optimize("fp-contract=off")
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*quantize_fn)(const float *, int64_t, int64_t, int64_t, void *, int);
typedef int (*matmul_fn)(int, const void *, int64_t, int64_t, const uint8_t *, int64_t, int64_t, float *, int64_t,
                         int);
typedef int (*attention_fn)(const float *, const float *, const float *, const uint8_t *, const int64_t *,
                            const int64_t *, float, float *, int);
typedef void (*rmsnorm_fn)(const float *, int64_t, int64_t, int64_t, const float *, float, float *, int);
typedef void (*silu_mul_fn)(const float *, int64_t, const float *, int64_t, int64_t, int64_t, float *, int);

typedef struct {
    quantize_fn quantize;
    matmul_fn matmul;
    attention_fn attention;
    rmsnorm_fn rmsnorm;
    silu_mul_fn silu_mul;
    int64_t xblock_bytes; /* one quantized 32-block of activations */
} Kernels;

typedef struct {
    int64_t type, n, k, ldw; /* ggml type, out and in features, bytes per stored row */
    const uint8_t *w;
    const int64_t *order; /* output i is stored row order[i]; NULL: in order */
} Lin;

typedef struct {
    const float *ln1, *ln2;
    float eps1, eps2;
    Lin q, k, v, o, gate, up, down;
} Layer;

typedef struct {
    int64_t M, C, H, Hkv, D, F;      /* rows, hidden, heads, kv heads, head dim, intermediate */
    float scale;                     /* attention scale */
    const float *cos, *sin;          /* (M, D), sin signed */
    const uint8_t *mask;             /* (M, used) with strides mask_s[0] (row), mask_s[1] (key) */
    int64_t mask_s[2];
    int64_t used, slot;              /* keys attended (cache slots 0..used-1), the slot written */
    float *const *keys, *const *values; /* per layer: (M, Hkv, slots, D) cache buffers */
    int64_t cache_s[3];              /* their strides: row, head, slot (unit along D) */
    int nthreads;
} Step;

/* A spinning barrier of the step's threads. libgomp's own barrier sleeps almost at once as soon as
 * its process has more OpenMP threads than CPUs (any second thread that ever ran a parallel
 * region counts, e.g. a server's engine thread beside the main thread), and a futex wake-up per
 * barrier made a step twice as slow. This one spins, then yields the CPU while it keeps waiting. */
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

typedef struct {
    atomic_int count, phase;
} Barrier;

static void barrier_wait(Barrier *b, int n) {
    if (n == 1) return;
    const int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->count, 1) == n - 1) {
        atomic_store(&b->count, 0);
        atomic_fetch_add(&b->phase, 1);
        return;
    }
    for (long spins = 0; atomic_load(&b->phase) == phase; spins++) {
        if (spins < 2000) cpu_relax();
        else sched_yield();
    }
}

/* this thread's share [n0, n1) of N outputs, in whole 16-row tiles (the kernels' unit) */
static void share(int64_t N, int t, int nt, int64_t *n0, int64_t *n1) {
    const int64_t tiles = (N + 15) / 16;
    *n0 = tiles * t / nt * 16;
    *n1 = tiles * (t + 1) / nt * 16;
    if (*n1 > N) *n1 = N;
    if (*n0 > N) *n0 = N;
}

/* rows [n0, n1) of out (M, N) = xq . W^T, on this thread alone; each output does not depend on
 * which rows share the call (ggml.c), so the split changes no bit */
static int linear_part(const Kernels *kn, const Lin *l, const void *xq, int64_t M, float *out, int t, int nt) {
    int64_t n0, n1;
    share(l->n, t, nt, &n0, &n1);
    if (n1 <= n0) return 0;
    return kn->matmul((int)l->type, xq, M, l->k, l->w + n0 * l->ldw, n1 - n0, l->ldw, out + n0, l->n, 1);
}

/* y (M, heads, D) = rope(gathered raw rows) */
static void rope(const float *raw, const int64_t *order, int64_t M, int64_t heads, int64_t D, const float *cos,
                 const float *sin, float *tmp, float *y) {
    const int64_t N = heads * D, half = D / 2;
    for (int64_t m = 0; m < M; m++) {
        const float *r = raw + m * N;
        const float *x = r;
        if (order) {
            for (int64_t i = 0; i < N; i++) tmp[i] = r[order[i]];
            x = tmp;
        }
        const float *c = cos + m * D, *s = sin + m * D;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + h * D;
            float *yh = y + m * N + h * D;
            for (int64_t j = 0; j < D; j++) {
                const float a = xh[j] * c[j];
                const float b = xh[(j + half) % D] * s[j];
                yh[j] = a + b;
            }
        }
    }
}

static void add(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = x[i] + y[i];
}

/* x (M, C) float32, updated in place through every layer. Returns 0, -1 for a kernel's refusal,
 * -2 when scratch memory cannot be allocated.
 *
 * One parallel region for the whole step: each thread computes its share of every projection's
 * rows and of the attention's (row, kv head) items; the small serial parts (norms, activation
 * quantization, rope, residuals) run on one thread between barriers. Starting a parallel region
 * per kernel cost more than the kernels of a small model (bench/RESULTS.md). */
int mlm_decode_layers(const Kernels *kn, const Layer *layers, int64_t L, const Step *st, float *x) {
    const int64_t M = st->M, C = st->C, H = st->H, Hkv = st->Hkv, D = st->D, F = st->F;
    const int64_t HD = H * D, KD = Hkv * D, widest = (C > F ? C : F) > HD ? (C > F ? C : F) : HD;
    const int64_t rep = H / Hkv;
    float *buf = malloc(sizeof(float) * (size_t)(M * (2 * C + 3 * HD + 3 * KD + 3 * F) + HD));
    void *xq = malloc((size_t)(M * (widest / 32) * kn->xblock_bytes));
    if (buf == NULL || xq == NULL || Hkv <= 0 || H % Hkv) {
        free(buf);
        free(xq);
        return buf == NULL || xq == NULL ? -2 : -1;
    }
    float *xn = buf, *o = xn + M * C, *qraw = o + M * C, *q = qraw + M * HD, *att = q + M * HD;
    float *kraw = att + M * HD, *k = kraw + M * KD, *v = k + M * KD, *gate = v + M * KD, *up = gate + M * F;
    float *act = up + M * F, *tmp = act + M * F;
    int rc = 0;
    /* one (row, kv head) item: q (1, rep, 1, D), its keys and values (1, 1, used, D), mask (1, 1, 1, used) */
    const int64_t shape[6] = {1, rep, 1, 1, st->used, D};
    const int64_t strides[12] = {HD, D, D, st->cache_s[0], st->cache_s[1], st->cache_s[2],
                                 st->cache_s[0], st->cache_s[1], st->cache_s[2], st->mask_s[0], 0, st->mask_s[1]};
    Barrier bar = {0, 0};
#pragma omp parallel num_threads(st->nthreads) reduction(| : rc)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t li = 0; li < L; li++) {
            const Layer *ly = layers + li;
            float *keys = st->keys[li], *values = st->values[li];
            /* attention block */
            if (t == 0) {
                kn->rmsnorm(x, M, C, C, ly->ln1, ly->eps1, xn, 1);
                kn->quantize(xn, M, C, C, xq, 1);
            }
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->q, xq, M, qraw, t, nt);
            rc |= linear_part(kn, &ly->k, xq, M, kraw, t, nt);
            rc |= linear_part(kn, &ly->v, xq, M, v, t, nt);
            barrier_wait(&bar, nt);
            if (t == 0) {
                rope(qraw, ly->q.order, M, H, D, st->cos, st->sin, tmp, q);
                rope(kraw, ly->k.order, M, Hkv, D, st->cos, st->sin, tmp, k);
                for (int64_t m = 0; m < M; m++)
                    for (int64_t g = 0; g < Hkv; g++) {
                        const int64_t at = m * st->cache_s[0] + g * st->cache_s[1] + st->slot * st->cache_s[2];
                        memcpy(keys + at, k + (m * Hkv + g) * D, sizeof(float) * (size_t)D);
                        memcpy(values + at, v + (m * Hkv + g) * D, sizeof(float) * (size_t)D);
                    }
            }
            barrier_wait(&bar, nt);
            for (int64_t it = t; it < M * Hkv; it += nt) {
                const int64_t m = it / Hkv, g = it % Hkv, cache_at = m * st->cache_s[0] + g * st->cache_s[1];
                rc |= kn->attention(q + (m * H + g * rep) * D, keys + cache_at, values + cache_at,
                                    st->mask + m * st->mask_s[0], shape, strides, st->scale,
                                    att + (m * H + g * rep) * D, 1);
            }
            barrier_wait(&bar, nt);
            if (t == 0) kn->quantize(att, M, HD, HD, xq, 1);
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->o, xq, M, o, t, nt);
            barrier_wait(&bar, nt);
            /* MLP block */
            if (t == 0) {
                add(x, o, M * C);
                kn->rmsnorm(x, M, C, C, ly->ln2, ly->eps2, xn, 1);
                kn->quantize(xn, M, C, C, xq, 1);
            }
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->gate, xq, M, gate, t, nt);
            rc |= linear_part(kn, &ly->up, xq, M, up, t, nt);
            {   /* this thread's gate and up rows are its own: their product needs no barrier */
                int64_t f0, f1;
                share(F, t, nt, &f0, &f1);
                for (int64_t m = 0; m < M && f1 > f0; m++)
                    kn->silu_mul(gate + m * F + f0, F, up + m * F + f0, F, 1, f1 - f0, act + m * F + f0, 1);
            }
            barrier_wait(&bar, nt);
            if (t == 0) kn->quantize(act, M, F, F, xq, 1);
            barrier_wait(&bar, nt);
            rc |= linear_part(kn, &ly->down, xq, M, o, t, nt);
            barrier_wait(&bar, nt);
            if (t == 0) add(x, o, M * C); /* the next layer's first barrier follows its norm, which reads x on thread 0 too */
        }
    }
    free(buf);
    free(xq);
    return rc == 0 ? 0 : rc == -2 ? -2 : -1;
}
