/* Batch-invariant float32 attention and RMSNorm for CPU inference (see attention.py).
 *
 * Attention: for each (batch b, head h, query i), with g = h / (H / H_kv) its key/value head,
 *
 *   allowed = [j in key order : mask[b, i, j]]          (mask NULL: j <= i, plain causal)
 *   s_n     = dot(q[b,h,i], k[b,g,allowed_n]) * scale
 *   p_n     = exp(s_n - max_n s_n)
 *   out     = (sum_n p_n v[b,g,allowed_n]) / (sum_n p_n)   (no allowed key: zeros, as SDPA)
 *
 * Every sum has one fixed order that depends only on the data it sums:
 *   dot      16 lane accumulators over head_dim (lane l: elements d = l mod 16, fma in d order),
 *            then one tree: l + l+8, + l+4, + l+2, + l+1;
 *   sum p    16 lane accumulators over the allowed keys (lane n mod 16, add in key order), same tree;
 *   out[d]   fma(p_n, v_n[d], acc[d]) in key order, then one division by the sum;
 *   exp      one polynomial (Cephes expf with fma), identical for every element.
 * So a query's output depends only on q, its allowed keys and values and their order: not on how
 * many queries share the call, how many masked slots the cache has, the tiling or the threads
 * (batch invariance). The AVX-512, AVX2 (two 8-lane halves = the 16 lanes) and scalar (fmaf)
 * paths perform exactly these operations, so all three give bit-identical results.
 *
 * RMSNorm: y = w * (x * (1 / sqrt(sum(x^2) / C + eps))), the sum in the same 16-lane order.
 *
 * SiLU-gated product (the MLP): y = (g / (1 + exp(-g))) * u elementwise, with the same exp, its
 * argument clamped to [-87, 88] (beyond, the quotient is g or vanishes either way).
 *
 * bfloat16 variants (the *_bf16 functions): bf16 values travel as uint16_t, the upper half of a
 * float32, so widening is exact (a shift). Each computes exactly what its float32 kernel computes
 * from the widened inputs, in the same orders (K/V widened as they are loaded: a long cache is
 * never copied), and rounds to bf16 where torch's bf16 expression rounds (round to nearest even,
 * NaN -> 0x7FC0, c10::BFloat16's rule, done with integers: no ISA's own conversion, whose NaN and
 * denormal handling differ):
 *   attention  bf16(out);
 *   RMSNorm    bf16(w * bf16(x * r)), r as above (MistralRMSNorm's `weight * (x * r).to(bf16)`);
 *   SiLU       bf16(bf16(silu(g)) * u) (torch's `F.silu(g) * u` on bf16 tensors, our exp).
 * mlm_attention_kv16 / _kvf16 (float32 queries over a bfloat16 / float16 KV cache) round nothing:
 * mlm_attention of q and the widened keys and values, the grouped kernels the float32 ones with
 * 16-bit loads.
 *
 * Contraction of a*b+c into fma is switched off: every fma here is written out.
 */
#pragma GCC optimize("fp-contract=off")
#include "float_common.h"
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>


/* Cephes expf: x = n ln2 + r, exp(r) by a degree-5 polynomial, times 2^n. Inputs are <= 0 here
 * (s - max); they are clamped at -87 so 2^n stays a normal number (exp(-87) ~ 1.6e-38 counts as
 * nothing next to the maximum's 1). */
#define EXP_LO (-87.0f)
#define EXP_HI 88.0f /* exp(88) ~ 1.7e38: 2^n stays finite */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define P0 1.9875691500e-4f
#define P1 1.3981999507e-3f
#define P2 8.3334519073e-3f
#define P3 4.1665795894e-2f
#define P4 1.6666665459e-1f
#define P5 5.0000001201e-1f

static int isa_level = -1;

/* ================================================================ scalar: the definition */
static float dot_s(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    for (int64_t d = 0; d < n; d += 16)
        for (int l = 0; l < 16; l++) {
            const int in = d + l < n;
            acc[l] = fmaf(in ? a[d + l] : 0.0f, in ? b[d + l] : 0.0f, acc[l]);
        }
    return tree16(acc);
}

static float exp_s(float x) {
    x = x < EXP_LO ? EXP_LO : x;
    const float n = floorf(fmaf(x, LOG2E, 0.5f));
    float r = fmaf(-n, LN2_HI, x);
    r = fmaf(-n, LN2_LO, r);
    const float z = r * r;
    float y = fmaf(P0, r, P1);
    y = fmaf(y, r, P2);
    y = fmaf(y, r, P3);
    y = fmaf(y, r, P4);
    y = fmaf(y, r, P5);
    y = fmaf(y, z, r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float pow2;
    memcpy(&pow2, &bits, 4);
    return y * pow2;
}

static void scores_s(const float *q, const float *k, int64_t ks, const int32_t *idx, int64_t n, int64_t D,
                     float scale, float *s) {
    for (int64_t j = 0; j < n; j++) s[j] = dot_s(q, k + idx[j] * ks, D) * scale;
}

static float softmax_s(float *s, int64_t n) { /* s <- exp(s - max) in place; returns the sum */
    float m = s[0], acc[16] = {0};
    for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int64_t j = 0; j < n; j++) {
        s[j] = exp_s(s[j] - m);
        acc[j % 16] = acc[j % 16] + s[j];
    }
    return tree16(acc);
}

static void weighted_s(const float *p, float sum, const float *v, int64_t vs, const int32_t *idx, int64_t n,
                       int64_t D, float *out) {
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc = fmaf(p[j], v[idx[j] * vs + d], acc);
        out[d] = acc / sum;
    }
}

static void rmsnorm_row_s(const float *x, const float *w, int64_t C, float eps, float *y) {
    const float r = 1.0f / sqrtf(dot_s(x, x, C) / (float)C + eps);
    for (int64_t c = 0; c < C; c++) y[c] = w[c] * (x[c] * r);
}

static void silu_mul_row_s(const float *g, const float *u, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j++) {
        const float x = -g[j] > EXP_HI ? EXP_HI : -g[j];
        y[j] = g[j] / (1.0f + exp_s(x)) * u[j];
    }
}

/* ---------------------------------------------------------------- scalar bf16 */
static inline float round_bf_s(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static float dot_bf16_s(const float *a, const uint16_t *b, int64_t n) { /* dot_s with b widened */
    float acc[16] = {0};
    for (int64_t d = 0; d < n; d += 16)
        for (int l = 0; l < 16; l++) {
            const int in = d + l < n;
            acc[l] = fmaf(in ? a[d + l] : 0.0f, in ? bf16_to_f32(b[d + l]) : 0.0f, acc[l]);
        }
    return tree16(acc);
}

static void scores_bf16_s(const float *q, const uint16_t *k, int64_t ks, const int32_t *idx, int64_t n, int64_t D,
                          float scale, float *s) {
    for (int64_t j = 0; j < n; j++) s[j] = dot_bf16_s(q, k + idx[j] * ks, D) * scale;
}

static void weighted_bf16_s(const float *p, float sum, const uint16_t *v, int64_t vs, const int32_t *idx,
                            int64_t n, int64_t D, uint16_t *out) {
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < n; j++) acc = fmaf(p[j], bf16_to_f32(v[idx[j] * vs + d]), acc);
        out[d] = f32_to_bf16(acc / sum);
    }
}

static void rmsnorm_row_bf16_s(const uint16_t *x, const uint16_t *w, int64_t C, float eps, uint16_t *y) {
    float acc[16] = {0};
    for (int64_t c = 0; c < C; c += 16)
        for (int l = 0; l < 16; l++) {
            const float xf = c + l < C ? bf16_to_f32(x[c + l]) : 0.0f;
            acc[l] = fmaf(xf, xf, acc[l]);
        }
    const float r = 1.0f / sqrtf(tree16(acc) / (float)C + eps);
    for (int64_t c = 0; c < C; c++) y[c] = f32_to_bf16(bf16_to_f32(w[c]) * round_bf_s(bf16_to_f32(x[c]) * r));
}

static void silu_mul_row_bf16_s(const uint16_t *g, const uint16_t *u, int64_t n, uint16_t *y) {
    for (int64_t j = 0; j < n; j++) {
        const float gf = bf16_to_f32(g[j]), x = -gf > EXP_HI ? EXP_HI : -gf;
        y[j] = f32_to_bf16(round_bf_s(gf / (1.0f + exp_s(x))) * bf16_to_f32(u[j]));
    }
}

/* Software prefetch of the cache rows a grouped decode kernel reads next: a decode step finds
 * its keys and values in memory (the weights it streamed since the last step evicted them), and
 * with the hardware prefetcher alone the kernels waited on them (bench/RESULTS.md). Leads: keys
 * KEY_LEAD steps of the score loop ahead, values VALUE_LEAD keys ahead. Hints change no result. */
#define KEY_LEAD 8
#define VALUE_LEAD 32

static inline __attribute__((always_inline)) void prefetch_bytes(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

/* the KB key rows (row bytes each) a score loop at key j reads KEY_LEAD steps later */
static inline __attribute__((always_inline)) void prefetch_keys(const void *k, int64_t ks, const int32_t *idx,
                                                                int64_t j, int KB, int64_t n, int64_t row, int es) {
    if (j + (KEY_LEAD + 1) * KB <= n)
        for (int t = 0; t < KB; t++) prefetch_bytes((const char *)k + idx[j + KEY_LEAD * KB + t] * ks * es, row);
}

/* the `bytes` at lane d of the value row a weighted loop at key j reads VALUE_LEAD keys later */
static inline __attribute__((always_inline)) void prefetch_value(const void *v, int64_t vs, const int32_t *idx,
                                                                 int64_t j, int64_t n, int64_t d, int64_t bytes, int es) {
    if (j + VALUE_LEAD < n) prefetch_bytes((const char *)v + (idx[j + VALUE_LEAD] * vs + d) * es, bytes);
}

/* ================================================================ AVX-512 */
T512 static inline __mmask16 tail16(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

T512 static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_LO));
    const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
                                          _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    const __m512 z = _mm512_mul_ps(r, r);
    __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(P0), r, _mm512_set1_ps(P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(P4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(P5));
    y = _mm512_add_ps(_mm512_fmadd_ps(y, z, r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

T512 static float dot512(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
        const __mmask16 m = tail16(n - d);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
    }
    return hsum512(acc);
}

/* tree16 of 16 vectors at once: lane k of the result = hsum512(a[k]), the same additions in the
 * same order (l + l+8, + l+4, + l+2, + l+1), done on 16 keys together with 15 shuffle pairs
 * instead of one reduction per key. */
T512 static inline __attribute__((always_inline)) __m512 tree16x16(const __m512 a[16]) {
    __m512 u[8], v[4];
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++) /* 128-bit lanes: key 2p's l and l+8 halves, then key 2p+1's */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(a[2 * p], a[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++) /* 128-bit lane c: key 4p + c's four s4 */
        v[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 w01 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]))),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(v[0]), _mm512_castps_pd(v[1]))));
    const __m512 w23 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(v[2]), _mm512_castps_pd(v[3]))),
                                     _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(v[2]), _mm512_castps_pd(v[3]))));
    /* lane 4c + t: key 4t + c */
    const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_ps(w01, w23, _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), z);
}

/* scores512 for fewer keys than a step of group_scores_r takes: four at a time, then one. */
T512 static void scores512_few(const float *q, const float *k, int64_t ks, const int32_t *idx, int64_t n, int64_t D,
                               float scale, float *s) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) { /* four keys at once: four independent chains, each key's the same */
        const float *k0 = k + idx[j] * ks, *k1 = k + idx[j + 1] * ks, *k2 = k + idx[j + 2] * ks,
                    *k3 = k + idx[j + 3] * ks;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail16(D - d);
            const __m512 x = _mm512_maskz_loadu_ps(m, q + d);
            a0 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, k0 + d), a0);
            a1 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, k1 + d), a1);
            a2 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, k2 + d), a2);
            a3 = _mm512_fmadd_ps(x, _mm512_maskz_loadu_ps(m, k3 + d), a3);
        }
        s[j] = hsum512(a0) * scale;
        s[j + 1] = hsum512(a1) * scale;
        s[j + 2] = hsum512(a2) * scale;
        s[j + 3] = hsum512(a3) * scale;
    }
    for (; j < n; j++) s[j] = dot512(q, k + idx[j] * ks, D) * scale;
}

T512 static float softmax512(float *s, int64_t n) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(vm, tail16(n - j), s + j));
    vm = _mm512_set1_ps(_mm512_reduce_max_ps(vm)); /* max is exact in any order */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail16(n - j);
        const __m512 p = exp512(_mm512_sub_ps(_mm512_mask_loadu_ps(vm, m, s + j), vm));
        _mm512_mask_storeu_ps(s + j, m, p);
        acc = _mm512_mask_add_ps(acc, m, acc, p);
    }
    return hsum512(acc);
}

/* 16 values of a 16-bit cache row widened exactly (masked lanes: 0): kind 1 bfloat16, 2 float16. */
T512 static inline __attribute__((always_inline)) __m512 load16x16(const uint16_t *p, __mmask16 m, const int kind) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return kind == 2 ? _mm512_cvtph_ps(h) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* scores512_few over 16-bit keys (a bf16 model's, or a 16-bit cache): the same chains, the keys
 * widened as they are loaded. */
T512 static inline __attribute__((always_inline)) void scores16_512_few(const float *q, const uint16_t *k, int64_t ks,
                                                                       const int32_t *idx, int64_t n, int64_t D,
                                                                       float scale, float *s, const int kind) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const uint16_t *k0 = k + idx[j] * ks, *k1 = k + idx[j + 1] * ks, *k2 = k + idx[j + 2] * ks,
                       *k3 = k + idx[j + 3] * ks;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail16(D - d);
            const __m512 x = _mm512_maskz_loadu_ps(m, q + d);
            a0 = _mm512_fmadd_ps(x, load16x16(k0 + d, m, kind), a0);
            a1 = _mm512_fmadd_ps(x, load16x16(k1 + d, m, kind), a1);
            a2 = _mm512_fmadd_ps(x, load16x16(k2 + d, m, kind), a2);
            a3 = _mm512_fmadd_ps(x, load16x16(k3 + d, m, kind), a3);
        }
        s[j] = hsum512(a0) * scale;
        s[j + 1] = hsum512(a1) * scale;
        s[j + 2] = hsum512(a2) * scale;
        s[j + 3] = hsum512(a3) * scale;
    }
    for (; j < n; j++) {
        const uint16_t *kr = k + idx[j] * ks;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail16(D - d);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16x16(kr + d, m, kind), acc);
        }
        s[j] = hsum512(acc) * scale;
    }
}

/* GROUP_Q queries that share their key/value head and their allowed keys (the heads of one query
 * position under GQA) at once: each key and value row is loaded once for all of them, where one
 * query at a time loads it per query (the load port, not the fma, bounded the kernel). A query's
 * operations and their order do not depend on how many share the call: with one query these are
 * scores512 and weighted512, so the bits are the same. */
#define GROUP_Q 4

T512 static inline __attribute__((always_inline)) void group_scores_r(const float *const *q, const int R, const void *k,
                                                                     int64_t ks, const int32_t *idx, int64_t n,
                                                                     int64_t D, float scale, float *const *s,
                                                                     const int K16) { /* K16: k is 16-bit, of that kind */
    const int KB = 16 / R; /* keys per step: R * KB <= 16 chains, reduced together */
    int64_t j = 0;
    for (; j + KB <= n; j += KB) {
        const char *kr[16];
        __m512 a[16];
#pragma GCC unroll 16
        for (int t = 0; t < 16; t++) a[t] = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int t = 0; t < KB; t++) kr[t] = (const char *)k + idx[j + t] * ks * (K16 ? 2 : 4);
        prefetch_keys(k, ks, idx, j, KB, n, D * (K16 ? 2 : 4), K16 ? 2 : 4);
        for (int64_t d = 0; d < D; d += 16) {
            const __mmask16 m = tail16(D - d);
            __m512 kv[16];
#pragma GCC unroll 16
            for (int t = 0; t < KB; t++)
                kv[t] = K16 ? load16x16((const uint16_t *)kr[t] + d, m, K16) : _mm512_maskz_loadu_ps(m, (const float *)kr[t] + d);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512 x = _mm512_maskz_loadu_ps(m, q[r] + d);
#pragma GCC unroll 16
                for (int t = 0; t < KB; t++) a[r * KB + t] = _mm512_fmadd_ps(x, kv[t], a[r * KB + t]);
            }
        }
        float z[16];
        _mm512_storeu_ps(z, _mm512_mul_ps(tree16x16(a), _mm512_set1_ps(scale)));
        for (int r = 0; r < R; r++) memcpy(s[r] + j, z + r * KB, sizeof(float) * (size_t)KB);
    }
    if (j < n)
        for (int r = 0; r < R; r++) {
            if (K16) scores16_512_few(q[r], (const uint16_t *)k, ks, idx + j, n - j, D, scale, s[r] + j, K16);
            else scores512_few(q[r], (const float *)k, ks, idx + j, n - j, D, scale, s[r] + j);
        }
}

T512 static void scores512(const float *q, const float *k, int64_t ks, const int32_t *idx, int64_t n, int64_t D,
                           float scale, float *s) {
    group_scores_r(&q, 1, k, ks, idx, n, D, scale, &s, 0); /* one query: sixteen keys a step */
}

T512 static inline __attribute__((always_inline)) void group_scores512_k(const float *const *q, int R, const void *k,
                                                                        int64_t ks, const int32_t *idx, int64_t n,
                                                                        int64_t D, float scale, float *const *s,
                                                                        const int K16) {
    switch (R) {
    case 1: group_scores_r(q, 1, k, ks, idx, n, D, scale, s, K16); break;
    case 2: group_scores_r(q, 2, k, ks, idx, n, D, scale, s, K16); break;
    case 3: group_scores_r(q, 3, k, ks, idx, n, D, scale, s, K16); break;
    default: group_scores_r(q, 4, k, ks, idx, n, D, scale, s, K16); break;
    }
}

T512 static void group_scores512(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                 int64_t n, int64_t D, float scale, float *const *s) {
    group_scores512_k(q, R, k, ks, idx, n, D, scale, s, 0);
}

T512 static void group_scores_kv16_512(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                       int64_t n, int64_t D, float scale, float *const *s) {
    group_scores512_k(q, R, k, ks, idx, n, D, scale, s, 1);
}

T512 static void group_scores_kvh_512(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                      int64_t n, int64_t D, float scale, float *const *s) {
    group_scores512_k(q, R, k, ks, idx, n, D, scale, s, 2);
}

/* Outputs [d, d + 16 NC) of each of R queries (NC 16-lane registers each, the last one masked
 * by mk[NC - 1]), keys in order. NC is a constant: a share of 32 lanes (the fused step's split)
 * does no work for the absent upper half. */
T512 static inline __attribute__((always_inline)) void group_weighted_d(const float *const *p, const float *sums,
                                                                       const int R, const int NC, const void *v,
                                                                       int64_t vs, const int32_t *idx, int64_t n,
                                                                       int64_t D, int64_t d, const __mmask16 *mk,
                                                                       float *const *out, const int K16) {
    __m512 a[GROUP_Q][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++) a[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j++) {
        const char *vr = (const char *)v + (idx[j] * vs + d) * (K16 ? 2 : 4);
        prefetch_value(v, vs, idx, j, n, d, (D - d < 64 ? D - d : 64) * (K16 ? 2 : 4), K16 ? 2 : 4);
        __m512 x[4];
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
            x[c] = K16 ? load16x16((const uint16_t *)vr + 16 * c, mk[c], K16)
                       : _mm512_maskz_loadu_ps(mk[c], (const float *)vr + 16 * c);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m512 pj = _mm512_set1_ps(p[r][j]);
#pragma GCC unroll 4
            for (int c = 0; c < NC; c++) a[r][c] = _mm512_fmadd_ps(pj, x[c], a[r][c]);
        }
    }
    for (int r = 0; r < R; r++) {
        const __m512 vs_ = _mm512_set1_ps(sums[r]);
#pragma GCC unroll 4
        for (int c = 0; c < NC; c++) _mm512_mask_storeu_ps(out[r] + d + 16 * c, mk[c], _mm512_div_ps(a[r][c], vs_));
    }
}

T512 static inline __attribute__((always_inline)) void group_weighted_r(const float *const *p, const float *sums,
                                                                       const int R, const void *v, int64_t vs,
                                                                       const int32_t *idx, int64_t n, int64_t D,
                                                                       float *const *out, const int K16) {
    for (int64_t d = 0; d < D; d += 64) { /* up to 64 outputs of each query in four registers */
        const __mmask16 mk[4] = {tail16(D - d), D - d > 16 ? tail16(D - d - 16) : 0,
                                 D - d > 32 ? tail16(D - d - 32) : 0, D - d > 48 ? tail16(D - d - 48) : 0};
        switch (D - d > 48 ? 4 : (int)((D - d + 15) / 16)) {
        case 1: group_weighted_d(p, sums, R, 1, v, vs, idx, n, D, d, mk, out, K16); break;
        case 2: group_weighted_d(p, sums, R, 2, v, vs, idx, n, D, d, mk, out, K16); break;
        case 3: group_weighted_d(p, sums, R, 3, v, vs, idx, n, D, d, mk, out, K16); break;
        default: group_weighted_d(p, sums, R, 4, v, vs, idx, n, D, d, mk, out, K16); break;
        }
    }
}

T512 static inline __attribute__((always_inline)) void group_weighted512_k(const float *const *p, const float *sums,
                                                                          int R, const void *v, int64_t vs,
                                                                          const int32_t *idx, int64_t n, int64_t D,
                                                                          float *const *out, const int K16) {
    switch (R) {
    case 1: group_weighted_r(p, sums, 1, v, vs, idx, n, D, out, K16); break;
    case 2: group_weighted_r(p, sums, 2, v, vs, idx, n, D, out, K16); break;
    case 3: group_weighted_r(p, sums, 3, v, vs, idx, n, D, out, K16); break;
    default: group_weighted_r(p, sums, 4, v, vs, idx, n, D, out, K16); break;
    }
}

T512 static void group_weighted512(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                   const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted512_k(p, sums, R, v, vs, idx, n, D, out, 0);
}

T512 static void group_weighted_kv16_512(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                         const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted512_k(p, sums, R, v, vs, idx, n, D, out, 1);
}

T512 static void group_weighted_kvh_512(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                        const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted512_k(p, sums, R, v, vs, idx, n, D, out, 2);
}

T512 static void weighted512(const float *p, float sum, const float *v, int64_t vs, const int32_t *idx, int64_t n,
                             int64_t D, float *out) {
    group_weighted_r(&p, &sum, 1, v, vs, idx, n, D, &out, 0); /* one query: 64 outputs in four registers */
}

T512 static void rmsnorm_row512(const float *x, const float *w, int64_t C, float eps, float *y) {
    const __m128 ms = _mm_div_ss(_mm_set_ss(dot512(x, x, C)), _mm_set_ss((float)C));
    const __m128 r = _mm_div_ss(_mm_set_ss(1.0f), _mm_sqrt_ss(_mm_add_ss(ms, _mm_set_ss(eps))));
    const __m512 vr = _mm512_set1_ps(_mm_cvtss_f32(r));
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = tail16(C - c);
        _mm512_mask_storeu_ps(y + c, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + c),
                                                      _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + c), vr)));
    }
}

T512 static void silu_mul_row512(const float *g, const float *u, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail16(n - j);
        const __m512 gv = _mm512_maskz_loadu_ps(m, g + j);
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(EXP_HI)));
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
        _mm512_mask_storeu_ps(y + j, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + j)));
    }
}

/* ---------------------------------------------------------------- AVX-512 bf16 */
T512 static inline __m512 bf16x16(const uint16_t *p, __mmask16 m) { return load16x16(p, m, 1); }

T512 static inline __m512 round512(__m512 x) { /* f32_to_bf16, the result kept widened */
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                       _mm512_set1_epi32((int32_t)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000)));
}

T512 static inline void store_bf16x16(uint16_t *p, __mmask16 m, __m512 rounded) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

T512 static void scores_bf16_512(const float *q, const uint16_t *k, int64_t ks, const int32_t *idx, int64_t n,
                                 int64_t D, float scale, float *s) {
    scores16_512_few(q, k, ks, idx, n, D, scale, s, 1); /* one query: four keys a step */
}

T512 static void weighted_bf16_512(const float *p, float sum, const uint16_t *v, int64_t vs, const int32_t *idx,
                                   int64_t n, int64_t D, uint16_t *out) {
    const __m512 vs_ = _mm512_set1_ps(sum);
    for (int64_t d = 0; d < D; d += 64) {
        const __mmask16 m0 = tail16(D - d), m1 = D - d > 16 ? tail16(D - d - 16) : 0,
                        m2 = D - d > 32 ? tail16(D - d - 32) : 0, m3 = D - d > 48 ? tail16(D - d - 48) : 0;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < n; j++) {
            const uint16_t *vr = v + idx[j] * vs + d;
            const __m512 pj = _mm512_set1_ps(p[j]);
            a0 = _mm512_fmadd_ps(pj, bf16x16(vr, m0), a0);
            a1 = _mm512_fmadd_ps(pj, bf16x16(vr + 16, m1), a1);
            a2 = _mm512_fmadd_ps(pj, bf16x16(vr + 32, m2), a2);
            a3 = _mm512_fmadd_ps(pj, bf16x16(vr + 48, m3), a3);
        }
        store_bf16x16(out + d, m0, round512(_mm512_div_ps(a0, vs_)));
        store_bf16x16(out + d + 16, m1, round512(_mm512_div_ps(a1, vs_)));
        store_bf16x16(out + d + 32, m2, round512(_mm512_div_ps(a2, vs_)));
        store_bf16x16(out + d + 48, m3, round512(_mm512_div_ps(a3, vs_)));
    }
}

T512 static void rmsnorm_row_bf16_512(const uint16_t *x, const uint16_t *w, int64_t C, float eps, uint16_t *y) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < C; c += 16) {
        const __m512 xv = bf16x16(x + c, tail16(C - c));
        acc = _mm512_fmadd_ps(xv, xv, acc);
    }
    const __m128 ms = _mm_div_ss(_mm_set_ss(hsum512(acc)), _mm_set_ss((float)C));
    const __m128 r = _mm_div_ss(_mm_set_ss(1.0f), _mm_sqrt_ss(_mm_add_ss(ms, _mm_set_ss(eps))));
    const __m512 vr = _mm512_set1_ps(_mm_cvtss_f32(r));
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 m = tail16(C - c);
        const __m512 t = round512(_mm512_mul_ps(bf16x16(x + c, m), vr));
        store_bf16x16(y + c, m, round512(_mm512_mul_ps(bf16x16(w + c, m), t)));
    }
}

T512 static void silu_mul_row_bf16_512(const uint16_t *g, const uint16_t *u, int64_t n, uint16_t *y) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail16(n - j);
        const __m512 gv = bf16x16(g + j, m);
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(EXP_HI)));
        const __m512 s = round512(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
        store_bf16x16(y + j, m, round512(_mm512_mul_ps(s, bf16x16(u + j, m))));
    }
}

/* ================================================================ AVX2: the 16 lanes as two halves */
T256 static inline __m256i tail8(int64_t left) { /* lanes l < left */
    const int32_t c = left >= 8 ? 8 : (left < 0 ? 0 : (int32_t)left);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

T256 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(EXP_LO));
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    const __m256 z = _mm256_mul_ps(r, r);
    __m256 y = _mm256_fmadd_ps(_mm256_set1_ps(P0), r, _mm256_set1_ps(P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(P4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(P5));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

T256 static float dot256(const float *a, const float *b, int64_t n) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t d = 0; d < n; d += 16) {
        const __m256i m0 = tail8(n - d), m1 = tail8(n - d - 8);
        lo = _mm256_fmadd_ps(_mm256_maskload_ps(a + d, m0), _mm256_maskload_ps(b + d, m0), lo);
        hi = _mm256_fmadd_ps(_mm256_maskload_ps(a + d + 8, m1), _mm256_maskload_ps(b + d + 8, m1), hi);
    }
    return hsum256x2(lo, hi);
}

/* 8 values of a 16-bit cache row widened exactly, lanes l >= left 0: kind 1 bfloat16, 2 float16. */
T256 static inline __attribute__((always_inline)) __m256 load16x8(const uint16_t *p, int64_t left, const int kind) {
    uint16_t t[8] = {0}; /* AVX2 has no 16-bit masked load: never read past the row's end */
    if (left < 8 && left > 0) memcpy(t, p, sizeof(uint16_t) * (size_t)left);
    const __m128i h = _mm_loadu_si128((const __m128i *)(left >= 8 ? p : t));
    return kind == 2 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* GROUP_Q queries of one key/value head at once, as group_scores_r and group_weighted_r for
 * AVX-512: each key and value row is loaded once for all of them. Per query and key the chains
 * and reductions are scores256's and weighted256's, so the bits are the same. R queries times KB
 * keys take 2 * R * KB accumulators: at most eight of AVX2's sixteen registers. */
T256 static inline __attribute__((always_inline)) void group_scores256_r(const float *const *q, const int R, const int KB,
                                                                       const void *k, int64_t ks, const int32_t *idx,
                                                                       int64_t n, int64_t D, float scale, float *const *s,
                                                                       int64_t j, const int K16) { /* keys j.. in steps of KB */
    for (; j + KB <= n; j += KB) {
        const char *kr[2];
        __m256 lo[GROUP_Q][2], hi[GROUP_Q][2];
#pragma GCC unroll 2
        for (int t = 0; t < KB; t++) kr[t] = (const char *)k + idx[j + t] * ks * (K16 ? 2 : 4);
        prefetch_keys(k, ks, idx, j, KB, n, D * (K16 ? 2 : 4), K16 ? 2 : 4);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 2
            for (int t = 0; t < KB; t++) lo[r][t] = hi[r][t] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            const __m256i m0 = tail8(D - d), m1 = tail8(D - d - 8);
            __m256 kl[2], kh[2];
#pragma GCC unroll 2
            for (int t = 0; t < KB; t++) {
                kl[t] = K16 ? load16x8((const uint16_t *)kr[t] + d, D - d, K16)
                            : _mm256_maskload_ps((const float *)kr[t] + d, m0);
                kh[t] = K16 ? load16x8((const uint16_t *)kr[t] + d + 8, D - d - 8, K16)
                            : _mm256_maskload_ps((const float *)kr[t] + d + 8, m1);
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256 xl = _mm256_maskload_ps(q[r] + d, m0), xh = _mm256_maskload_ps(q[r] + d + 8, m1);
#pragma GCC unroll 2
                for (int t = 0; t < KB; t++) {
                    lo[r][t] = _mm256_fmadd_ps(xl, kl[t], lo[r][t]);
                    hi[r][t] = _mm256_fmadd_ps(xh, kh[t], hi[r][t]);
                }
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 2
            for (int t = 0; t < KB; t++) s[r][j + t] = hsum256x2(lo[r][t], hi[r][t]) * scale;
    }
}

T256 static inline __attribute__((always_inline)) void group_scores256_k(const float *const *q, int R, const void *k,
                                                                        int64_t ks, const int32_t *idx, int64_t n,
                                                                        int64_t D, float scale, float *const *s,
                                                                        const int K16) {
    switch (R) {
    case 1: /* two keys a step, then the odd one */
        group_scores256_r(q, 1, 2, k, ks, idx, n, D, scale, s, 0, K16);
        group_scores256_r(q, 1, 1, k, ks, idx, n, D, scale, s, n & ~(int64_t)1, K16);
        break;
    case 2:
        group_scores256_r(q, 2, 2, k, ks, idx, n, D, scale, s, 0, K16);
        group_scores256_r(q, 2, 1, k, ks, idx, n, D, scale, s, n & ~(int64_t)1, K16);
        break;
    case 3: group_scores256_r(q, 3, 1, k, ks, idx, n, D, scale, s, 0, K16); break;
    default: group_scores256_r(q, 4, 1, k, ks, idx, n, D, scale, s, 0, K16); break;
    }
}

T256 static void group_scores256(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                 int64_t n, int64_t D, float scale, float *const *s) {
    group_scores256_k(q, R, k, ks, idx, n, D, scale, s, 0);
}

T256 static void group_scores_kv16_256(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                       int64_t n, int64_t D, float scale, float *const *s) {
    group_scores256_k(q, R, k, ks, idx, n, D, scale, s, 1);
}

T256 static void group_scores_kvh_256(const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                                      int64_t n, int64_t D, float scale, float *const *s) {
    group_scores256_k(q, R, k, ks, idx, n, D, scale, s, 2);
}

/* W vectors (8 outputs each) of every query per pass over the keys. */
T256 static inline __attribute__((always_inline)) void group_weighted256_r(const float *const *p, const float *sums,
                                                                         const int R, const int W, const void *v,
                                                                         int64_t vs, const int32_t *idx, int64_t n,
                                                                         int64_t D, float *const *out, const int K16) {
    for (int64_t d = 0; d < D; d += 8 * W) {
        __m256i m[4];
        __m256 a[GROUP_Q][4];
#pragma GCC unroll 4
        for (int c = 0; c < W; c++) m[c] = tail8(D - d - 8 * c);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int c = 0; c < W; c++) a[r][c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const char *vr = (const char *)v + (idx[j] * vs + d) * (K16 ? 2 : 4);
            prefetch_value(v, vs, idx, j, n, d, (D - d < 8 * W ? D - d : 8 * W) * (K16 ? 2 : 4), K16 ? 2 : 4);
            __m256 x[4];
#pragma GCC unroll 4
            for (int c = 0; c < W; c++)
                x[c] = K16 ? load16x8((const uint16_t *)vr + 8 * c, D - d - 8 * c, K16)
                           : _mm256_maskload_ps((const float *)vr + 8 * c, m[c]);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256 pj = _mm256_set1_ps(p[r][j]);
#pragma GCC unroll 4
                for (int c = 0; c < W; c++) a[r][c] = _mm256_fmadd_ps(pj, x[c], a[r][c]);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256 vs_ = _mm256_set1_ps(sums[r]);
#pragma GCC unroll 4
            for (int c = 0; c < W; c++) _mm256_maskstore_ps(out[r] + d + 8 * c, m[c], _mm256_div_ps(a[r][c], vs_));
        }
    }
}

T256 static inline __attribute__((always_inline)) void group_weighted256_k(const float *const *p, const float *sums,
                                                                          int R, const void *v, int64_t vs,
                                                                          const int32_t *idx, int64_t n, int64_t D,
                                                                          float *const *out, const int K16) {
    switch (R) {
    case 1: group_weighted256_r(p, sums, 1, 4, v, vs, idx, n, D, out, K16); break;
    case 2: group_weighted256_r(p, sums, 2, 4, v, vs, idx, n, D, out, K16); break;
    case 3: group_weighted256_r(p, sums, 3, 2, v, vs, idx, n, D, out, K16); break;
    default: group_weighted256_r(p, sums, 4, 2, v, vs, idx, n, D, out, K16); break;
    }
}

T256 static void group_weighted256(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                   const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted256_k(p, sums, R, v, vs, idx, n, D, out, 0);
}

T256 static void group_weighted_kv16_256(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                         const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted256_k(p, sums, R, v, vs, idx, n, D, out, 1);
}

T256 static void group_weighted_kvh_256(const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                        const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    group_weighted256_k(p, sums, R, v, vs, idx, n, D, out, 2);
}

T256 static void scores256(const float *q, const float *k, int64_t ks, const int32_t *idx, int64_t n, int64_t D,
                           float scale, float *s) {
    group_scores256(&q, 1, k, ks, idx, n, D, scale, &s); /* one query: two keys a step */
}

T256 static void weighted256(const float *p, float sum, const float *v, int64_t vs, const int32_t *idx, int64_t n,
                             int64_t D, float *out) {
    group_weighted256_r(&p, &sum, 1, 4, v, vs, idx, n, D, &out, 0); /* one query: 32 outputs in four registers */
}

T256 static float softmax256(float *s, int64_t n) {
    float m = s[0];
    for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
    const __m256 vm = _mm256_set1_ps(m);
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t j = 0; j < n; j += 16) {
        const __m256i m0 = tail8(n - j), m1 = tail8(n - j - 8);
        const __m256 f0 = _mm256_castsi256_ps(m0), f1 = _mm256_castsi256_ps(m1); /* padding lanes: exp(0) */
        const __m256 p0 = exp256(_mm256_sub_ps(_mm256_blendv_ps(vm, _mm256_maskload_ps(s + j, m0), f0), vm));
        const __m256 p1 = exp256(_mm256_sub_ps(_mm256_blendv_ps(vm, _mm256_maskload_ps(s + j + 8, m1), f1), vm));
        _mm256_maskstore_ps(s + j, m0, p0);
        _mm256_maskstore_ps(s + j + 8, m1, p1);
        lo = _mm256_blendv_ps(lo, _mm256_add_ps(lo, p0), f0);
        hi = _mm256_blendv_ps(hi, _mm256_add_ps(hi, p1), f1);
    }
    return hsum256x2(lo, hi);
}

T256 static void rmsnorm_row256(const float *x, const float *w, int64_t C, float eps, float *y) {
    const __m128 ms = _mm_div_ss(_mm_set_ss(dot256(x, x, C)), _mm_set_ss((float)C));
    const __m128 r = _mm_div_ss(_mm_set_ss(1.0f), _mm_sqrt_ss(_mm_add_ss(ms, _mm_set_ss(eps))));
    const __m256 vr = _mm256_set1_ps(_mm_cvtss_f32(r));
    for (int64_t c = 0; c < C; c += 8) {
        const __m256i m = tail8(C - c);
        _mm256_maskstore_ps(y + c, m, _mm256_mul_ps(_mm256_maskload_ps(w + c, m),
                                                    _mm256_mul_ps(_mm256_maskload_ps(x + c, m), vr)));
    }
}

T256 static void silu_mul_row256(const float *g, const float *u, int64_t n, float *y) {
    for (int64_t j = 0; j < n; j += 8) {
        const __m256i m = tail8(n - j);
        const __m256 gv = _mm256_maskload_ps(g + j, m);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), _mm256_set1_ps(EXP_HI)));
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
        _mm256_maskstore_ps(y + j, m, _mm256_mul_ps(s, _mm256_maskload_ps(u + j, m)));
    }
}

/* ---------------------------------------------------------------- AVX2 bf16 */
T256 static inline __m256 bf16x8_all(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

T256 static inline __m256 bf16x8(const uint16_t *p, int64_t left) { return load16x8(p, left, 1); } /* lanes >= left: 0 */

T256 static inline __m256 round256(__m256 x) { /* f32_to_bf16, the result kept widened */
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb),
                                       _mm256_set1_epi32((int32_t)0xFFFF0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                            _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

T256 static inline void store_bf16x8(uint16_t *p, int64_t left, __m256 rounded) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16); /* 0..0xFFFF: packus is exact */
    const __m128i b = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    if (left >= 8) {
        _mm_storeu_si128((__m128i *)p, b);
    } else if (left > 0) {
        uint16_t t[8];
        _mm_storeu_si128((__m128i *)t, b);
        memcpy(p, t, sizeof(uint16_t) * (size_t)left);
    }
}

T256 static float dot_bf16_256(const float *a, const uint16_t *b, int64_t n) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t d = 0; d < n; d += 16) {
        lo = _mm256_fmadd_ps(_mm256_maskload_ps(a + d, tail8(n - d)), bf16x8(b + d, n - d), lo);
        hi = _mm256_fmadd_ps(_mm256_maskload_ps(a + d + 8, tail8(n - d - 8)), bf16x8(b + d + 8, n - d - 8), hi);
    }
    return hsum256x2(lo, hi);
}

T256 static void scores_bf16_256(const float *q, const uint16_t *k, int64_t ks, const int32_t *idx, int64_t n,
                                 int64_t D, float scale, float *s) {
    int64_t j = 0;
    const int64_t Dfull = D & ~(int64_t)15; /* whole 16-blocks: loads without a tail test */
    for (; j + 2 <= n; j += 2) {
        const uint16_t *k0 = k + idx[j] * ks, *k1 = k + idx[j + 1] * ks;
        __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0;
        int64_t d = 0;
        for (; d < Dfull; d += 16) {
            const __m256 xl = _mm256_loadu_ps(q + d), xh = _mm256_loadu_ps(q + d + 8);
            l0 = _mm256_fmadd_ps(xl, bf16x8_all(k0 + d), l0);
            h0 = _mm256_fmadd_ps(xh, bf16x8_all(k0 + d + 8), h0);
            l1 = _mm256_fmadd_ps(xl, bf16x8_all(k1 + d), l1);
            h1 = _mm256_fmadd_ps(xh, bf16x8_all(k1 + d + 8), h1);
        }
        if (d < D) {
            const __m256 xl = _mm256_maskload_ps(q + d, tail8(D - d));
            const __m256 xh = _mm256_maskload_ps(q + d + 8, tail8(D - d - 8));
            l0 = _mm256_fmadd_ps(xl, bf16x8(k0 + d, D - d), l0);
            h0 = _mm256_fmadd_ps(xh, bf16x8(k0 + d + 8, D - d - 8), h0);
            l1 = _mm256_fmadd_ps(xl, bf16x8(k1 + d, D - d), l1);
            h1 = _mm256_fmadd_ps(xh, bf16x8(k1 + d + 8, D - d - 8), h1);
        }
        s[j] = hsum256x2(l0, h0) * scale;
        s[j + 1] = hsum256x2(l1, h1) * scale;
    }
    for (; j < n; j++) s[j] = dot_bf16_256(q, k + idx[j] * ks, D) * scale;
}

T256 static void weighted_bf16_256(const float *p, float sum, const uint16_t *v, int64_t vs, const int32_t *idx,
                                   int64_t n, int64_t D, uint16_t *out) {
    const __m256 vs_ = _mm256_set1_ps(sum);
    for (int64_t d = 0; d < D; d += 32) {
        const int64_t left = D - d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        if (left >= 32) { /* the same fmas, loads without a tail test */
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *vr = v + idx[j] * vs + d;
                const __m256 pj = _mm256_set1_ps(p[j]);
                a0 = _mm256_fmadd_ps(pj, bf16x8_all(vr), a0);
                a1 = _mm256_fmadd_ps(pj, bf16x8_all(vr + 8), a1);
                a2 = _mm256_fmadd_ps(pj, bf16x8_all(vr + 16), a2);
                a3 = _mm256_fmadd_ps(pj, bf16x8_all(vr + 24), a3);
            }
        } else {
            for (int64_t j = 0; j < n; j++) {
                const uint16_t *vr = v + idx[j] * vs + d;
                const __m256 pj = _mm256_set1_ps(p[j]);
                a0 = _mm256_fmadd_ps(pj, bf16x8(vr, left), a0);
                a1 = _mm256_fmadd_ps(pj, bf16x8(vr + 8, left - 8), a1);
                a2 = _mm256_fmadd_ps(pj, bf16x8(vr + 16, left - 16), a2);
                a3 = _mm256_fmadd_ps(pj, bf16x8(vr + 24, left - 24), a3);
            }
        }
        store_bf16x8(out + d, left, round256(_mm256_div_ps(a0, vs_)));
        store_bf16x8(out + d + 8, left - 8, round256(_mm256_div_ps(a1, vs_)));
        store_bf16x8(out + d + 16, left - 16, round256(_mm256_div_ps(a2, vs_)));
        store_bf16x8(out + d + 24, left - 24, round256(_mm256_div_ps(a3, vs_)));
    }
}

T256 static void rmsnorm_row_bf16_256(const uint16_t *x, const uint16_t *w, int64_t C, float eps, uint16_t *y) {
    __m256 lo = _mm256_setzero_ps(), hi = lo;
    for (int64_t c = 0; c < C; c += 16) {
        const __m256 xl = bf16x8(x + c, C - c), xh = bf16x8(x + c + 8, C - c - 8);
        lo = _mm256_fmadd_ps(xl, xl, lo);
        hi = _mm256_fmadd_ps(xh, xh, hi);
    }
    const __m128 ms = _mm_div_ss(_mm_set_ss(hsum256x2(lo, hi)), _mm_set_ss((float)C));
    const __m128 r = _mm_div_ss(_mm_set_ss(1.0f), _mm_sqrt_ss(_mm_add_ss(ms, _mm_set_ss(eps))));
    const __m256 vr = _mm256_set1_ps(_mm_cvtss_f32(r));
    for (int64_t c = 0; c < C; c += 8) {
        const __m256 t = round256(_mm256_mul_ps(bf16x8(x + c, C - c), vr));
        store_bf16x8(y + c, C - c, round256(_mm256_mul_ps(bf16x8(w + c, C - c), t)));
    }
}

T256 static void silu_mul_row_bf16_256(const uint16_t *g, const uint16_t *u, int64_t n, uint16_t *y) {
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 gv = bf16x8(g + j, n - j);
        const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv), _mm256_set1_ps(EXP_HI)));
        const __m256 s = round256(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
        store_bf16x8(y + j, n - j, round256(_mm256_mul_ps(s, bf16x8(u + j, n - j))));
    }
}

/* ================================================================ dispatch */
typedef struct {
    void (*scores)(const float *, const float *, int64_t, const int32_t *, int64_t, int64_t, float, float *);
    float (*softmax)(float *, int64_t);
    void (*weighted)(const float *, float, const float *, int64_t, const int32_t *, int64_t, int64_t, float *);
    void (*rmsnorm_row)(const float *, const float *, int64_t, float, float *);
    void (*silu_mul_row)(const float *, const float *, int64_t, float *);
    /* bf16 storage, float32 arithmetic (softmax is shared: scores are float32 either way) */
    void (*scores_bf16)(const float *, const uint16_t *, int64_t, const int32_t *, int64_t, int64_t, float, float *);
    void (*weighted_bf16)(const float *, float, const uint16_t *, int64_t, const int32_t *, int64_t, int64_t,
                          uint16_t *);
    void (*rmsnorm_row_bf16)(const uint16_t *, const uint16_t *, int64_t, float, uint16_t *);
    void (*silu_mul_row_bf16)(const uint16_t *, const uint16_t *, int64_t, uint16_t *);
    /* up to GROUP_Q queries of one key/value head at once (NULL: one query at a time) */
    /* by the keys' and values' kind: [0] float32, [1] bfloat16, [2] float16 (a 16-bit cache, widened
     * as it is loaded) */
    void (*group_scores[3])(const float *const *, int, const void *, int64_t, const int32_t *, int64_t, int64_t, float,
                            float *const *);
    void (*group_weighted[3])(const float *const *, const float *, int, const void *, int64_t, const int32_t *, int64_t,
                              int64_t, float *const *);
} Ops;

static const Ops OPS[3] = {
    {scores_s, softmax_s, weighted_s, rmsnorm_row_s, silu_mul_row_s, scores_bf16_s, weighted_bf16_s,
     rmsnorm_row_bf16_s, silu_mul_row_bf16_s, {NULL, NULL, NULL}, {NULL, NULL, NULL}},
    {scores256, softmax256, weighted256, rmsnorm_row256, silu_mul_row256, scores_bf16_256, weighted_bf16_256,
     rmsnorm_row_bf16_256, silu_mul_row_bf16_256, {group_scores256, group_scores_kv16_256, group_scores_kvh_256},
     {group_weighted256, group_weighted_kv16_256, group_weighted_kvh_256}},
    {scores512, softmax512, weighted512, rmsnorm_row512, silu_mul_row512, scores_bf16_512, weighted_bf16_512,
     rmsnorm_row_bf16_512, silu_mul_row_bf16_512, {group_scores512, group_scores_kv16_512, group_scores_kvh_512},
     {group_weighted512, group_weighted_kv16_512, group_weighted_kvh_512}},
};

int mlm_set_isa(int cap) {
    isa_level = capped_isa_level(cap);
    return isa_level;
}

static const Ops *ops(void) {
    if (isa_level < 0) mlm_set_isa(2);
    return &OPS[isa_level];
}

/* One (batch, head, query) of the work, in the order (b, g, i, r): neighbouring items read the same keys. */
typedef struct {
    int64_t b, g, h, i;
} Item;

static Item item_at(int64_t it, int64_t rep, int64_t Q, int64_t Hkv) {
    const int64_t r = it % rep, i = (it / rep) % Q, g = (it / (rep * Q)) % Hkv, b = it / (rep * Q * Hkv);
    return (Item){b, g, g * rep + r, i};
}

/* The keys a mask row allows (key j at row[j * stride]), in key order, into idx; returns how many. */
static int64_t masked_keys(const uint8_t *row, int64_t stride, int64_t K, int32_t *idx) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; j++)
        if (row[j * stride]) idx[n++] = (int32_t)j;
    return n;
}

/* The keys query (b, i) may see, in key order, into idx; returns how many. */
static int64_t allowed_keys(const uint8_t *mask, const int64_t *strides, int64_t b, int64_t i, int64_t K,
                            int32_t *idx) {
    if (mask != NULL) return masked_keys(mask + b * strides[9] + i * strides[10], strides[11], K, idx);
    int64_t n = 0;
    for (int64_t j = 0; j <= i && j < K; j++) idx[n++] = (int32_t)j;
    return n;
}

/* The (b, i) whose keys a thread's idx holds, and how many: a query's heads come one after
 * another and share them, so they are listed once. */
typedef struct {
    int64_t b, i, n;
} Listed;

static int64_t keys_for(Listed *l, const uint8_t *mask, const int64_t *strides, int64_t b, int64_t i, int64_t K,
                        int32_t *idx) {
    if (b != l->b || i != l->i) *l = (Listed){b, i, allowed_keys(mask, strides, b, i, K, idx)};
    return l->n;
}

/* A decode step over a few hundred keys takes tens of microseconds: not worth a fork. */
static int worth_threads(int nthreads, int64_t items, int64_t K, int64_t D) {
    return nthreads > 1 && items > 1 && items * K * D >= (1 << 20);
}

/* mlm_attention with the heads that share a key/value head taken GROUP_Q at a time: the work
 * unit is (b, g, i, a block of up to GROUP_Q of the group's heads). */
static int attention_grouped(const Ops *o, const float *q, const void *k, const void *v, const uint8_t *mask,
                             const int64_t *shape, const int64_t *strides, float scale, float *out, int nthreads,
                             int kind) { /* kind: k and v are 0 float32, 1 bfloat16, 2 float16 */
    const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Q = shape[3], K = shape[4], D = shape[5];
    const int64_t rep = H / Hkv, blocks = (rep + GROUP_Q - 1) / GROUP_Q, units = B * Hkv * Q * blocks;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (worth_threads(nthreads, B * H * Q, K, D)) reduction(| : failed)
    {
        int32_t *idx = malloc(sizeof(int32_t) * (size_t)(K + 1));
        float *sbuf = malloc(sizeof(float) * (size_t)(K + 16) * GROUP_Q);
        failed = idx == NULL || sbuf == NULL;
        Listed listed = {-1, -1, 0};
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            if (failed) continue;
            const int64_t blk = u % blocks, i = (u / blocks) % Q, g = (u / (blocks * Q)) % Hkv, b = u / (blocks * Q * Hkv);
            const int64_t h0 = g * rep + blk * GROUP_Q;
            const int R = (int)(rep - blk * GROUP_Q < GROUP_Q ? rep - blk * GROUP_Q : GROUP_Q);
            const int64_t n = keys_for(&listed, mask, strides, b, i, K, idx);
            const float *qr[GROUP_Q];
            float *dst[GROUP_Q], *sr[GROUP_Q], sums[GROUP_Q];
            for (int r = 0; r < R; r++) {
                qr[r] = q + b * strides[0] + (h0 + r) * strides[1] + i * strides[2];
                dst[r] = out + ((b * Q + i) * H + h0 + r) * D;
                sr[r] = sbuf + (size_t)r * (size_t)(K + 16);
            }
            if (n == 0) {
                for (int r = 0; r < R; r++) memset(dst[r], 0, sizeof(float) * (size_t)D);
                continue;
            }
            const size_t es = kind ? 2 : 4; /* element bytes */
            const char *kg = (const char *)k + (b * strides[3] + g * strides[4]) * es;
            const char *vg = (const char *)v + (b * strides[6] + g * strides[7]) * es;
            o->group_scores[kind](qr, R, kg, strides[5], idx, n, D, scale, sr);
            for (int r = 0; r < R; r++) sums[r] = o->softmax(sr[r], n);
            o->group_weighted[kind]((const float *const *)sr, sums, R, vg, strides[8], idx, n, D, dst);
        }
        free(idx);
        free(sbuf);
    }
    return failed ? -2 : 0;
}

/* shape: B, H, H_kv, Q, K, D. strides (in elements): q b,h,i; k b,g,j; v b,g,j; mask b,i,j.
 * q, k, v have unit stride along D; out is (B, Q, H, D) contiguous. Returns 0, or -1 on bad
 * arguments, -2 when scratch memory cannot be allocated. */
int mlm_attention(const float *q, const float *k, const float *v, const uint8_t *mask, const int64_t *shape,
                  const int64_t *strides, float scale, float *out, int nthreads) {
    const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Q = shape[3], K = shape[4], D = shape[5];
    if (Hkv <= 0 || H % Hkv || D <= 0 || K > INT32_MAX) return -1;
    const int64_t rep = H / Hkv, items = B * H * Q;
    const Ops *o = ops();
    if (o->group_scores[0] && rep > 1) return attention_grouped(o, q, k, v, mask, shape, strides, scale, out, nthreads, 0);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (worth_threads(nthreads, items, K, D)) reduction(| : failed)
    {
        int32_t *idx = malloc(sizeof(int32_t) * (size_t)(K + 1));
        float *s = malloc(sizeof(float) * (size_t)(K + 16));
        failed = idx == NULL || s == NULL;
        Listed listed = {-1, -1, 0};
#pragma omp for schedule(dynamic, 4) /* causal rows differ in cost; any split gives the same bits */
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            const Item t = item_at(it, rep, Q, Hkv);
            const int64_t n = keys_for(&listed, mask, strides, t.b, t.i, K, idx);
            float *dst = out + ((t.b * Q + t.i) * H + t.h) * D;
            if (n == 0) {
                memset(dst, 0, sizeof(float) * (size_t)D);
                continue;
            }
            const float *qr = q + t.b * strides[0] + t.h * strides[1] + t.i * strides[2];
            o->scores(qr, k + t.b * strides[3] + t.g * strides[4], strides[5], idx, n, D, scale, s);
            const float sum = o->softmax(s, n);
            o->weighted(s, sum, v + t.b * strides[6] + t.g * strides[7], strides[8], idx, n, D, dst);
        }
        free(idx);
        free(s);
    }
    return failed ? -2 : 0;
}

/* Rows (B, G, N) of D bf16 values at src (strides s[0..2]) widened into dst, contiguous. */
static void widen_rows(const uint16_t *src, const int64_t *s, int64_t B, int64_t G, int64_t N, int64_t D, float *dst,
                       int nthreads, int kind) { /* kind 1 bfloat16, 2 float16 */
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && B * G * N * D >= (1 << 16)) schedule(static)
    for (int64_t r = 0; r < B * G * N; r++) {
        const uint16_t *row = src + (r / (G * N)) * s[0] + ((r / N) % G) * s[1] + (r % N) * s[2];
        for (int64_t d = 0; d < D; d++) dst[r * D + d] = kind == 2 ? f16_to_f32(row[d]) : bf16_to_f32(row[d]);
    }
}

/* Queries in a call from which on mlm_attention_bf16 widens q, k and v once and runs the float32
 * kernel: the per-query path widens every key and value row again for each query that reads it,
 * while the copies cost fresh pages in proportion to the keys; set where the two break even at a
 * 7B's shape over long caches (bench/RESULTS.md). */
#define WIDEN_QUERIES 32

/* mlm_attention_bf16 by way of float32 copies: the definition itself, bf16(mlm_attention of the
 * widened inputs), so the same bits as the per-query path, and the float32 path shares each key
 * and value row among a query's heads (bench/RESULTS.md). Returns 1, having done nothing, when the
 * copies cannot be allocated. */
static int attention_bf16_widened(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                                  const int64_t *shape, const int64_t *strides, float scale, uint16_t *out,
                                  int nthreads) {
    const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Q = shape[3], K = shape[4], D = shape[5];
    const size_t nq = (size_t)(B * H * Q * D), nk = (size_t)(B * Hkv * K * D);
    float *qf = malloc(sizeof(float) * (2 * nq + 2 * nk));
    if (qf == NULL) return 1;
    float *kf = qf + nq, *vf = kf + nk, *of = vf + nk;
    widen_rows(q, strides, B, H, Q, D, qf, nthreads, 1);
    widen_rows(k, strides + 3, B, Hkv, K, D, kf, nthreads, 1);
    widen_rows(v, strides + 6, B, Hkv, K, D, vf, nthreads, 1);
    const int64_t wide[12] = {H * Q * D, Q * D, D, Hkv * K * D, K * D, D, Hkv * K * D, K * D, D,
                              strides[9], strides[10], strides[11]};
    const int rc = mlm_attention(qf, kf, vf, mask, shape, wide, scale, of, nthreads);
    if (rc == 0) {
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && nq >= (1 << 16)) schedule(static)
        for (size_t i = 0; i < nq; i++) out[i] = f32_to_bf16(of[i]);
    }
    free(qf);
    return rc;
}

/* mlm_attention on bf16 q, k, v (same shape, strides and codes), out bf16: bf16(mlm_attention of
 * the widened inputs). From WIDEN_QUERIES queries on, attention_bf16_widened; below, one query at
 * a time, its row widened once and the keys and values as they are loaded. */
int mlm_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                       const int64_t *shape, const int64_t *strides, float scale, uint16_t *out, int nthreads) {
    const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Q = shape[3], K = shape[4], D = shape[5];
    if (Hkv <= 0 || H % Hkv || D <= 0 || K > INT32_MAX) return -1;
    const int64_t rep = H / Hkv, items = B * H * Q;
    const Ops *o = ops();
    if (Q >= WIDEN_QUERIES && B * H * Q * D > 0) {
        const int rc = attention_bf16_widened(q, k, v, mask, shape, strides, scale, out, nthreads);
        if (rc != 1) return rc;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (worth_threads(nthreads, items, K, D)) reduction(| : failed)
    {
        int32_t *idx = malloc(sizeof(int32_t) * (size_t)(K + 1));
        float *s = malloc(sizeof(float) * (size_t)(K + 16)), *qf = malloc(sizeof(float) * (size_t)D);
        failed = idx == NULL || s == NULL || qf == NULL;
        Listed listed = {-1, -1, 0};
#pragma omp for schedule(dynamic, 4)
        for (int64_t it = 0; it < items; it++) {
            if (failed) continue;
            const Item t = item_at(it, rep, Q, Hkv);
            const int64_t n = keys_for(&listed, mask, strides, t.b, t.i, K, idx);
            uint16_t *dst = out + ((t.b * Q + t.i) * H + t.h) * D;
            if (n == 0) {
                memset(dst, 0, sizeof(uint16_t) * (size_t)D); /* bf16 +0 */
                continue;
            }
            const uint16_t *qr = q + t.b * strides[0] + t.h * strides[1] + t.i * strides[2];
            for (int64_t d = 0; d < D; d++) qf[d] = bf16_to_f32(qr[d]);
            o->scores_bf16(qf, k + t.b * strides[3] + t.g * strides[4], strides[5], idx, n, D, scale, s);
            const float sum = o->softmax(s, n);
            o->weighted_bf16(s, sum, v + t.b * strides[6] + t.g * strides[7], strides[8], idx, n, D, dst);
        }
        free(idx);
        free(s);
        free(qf);
    }
    return failed ? -2 : 0;
}

/* mlm_attention on float32 q and out over a 16-bit KV cache (kind 1 bfloat16, 2 float16; a GGUF
 * model's cache): exactly mlm_attention of q and the widened k and v. Below WIDEN_QUERIES queries
 * (decode) a query position's heads go together through the grouped kernels, each key and value
 * widened as it is loaded; from there on (a prefill), and on the scalar path, k and v are widened
 * once and the float32 kernel runs. */
static int attention_kv(int kind, const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                        const int64_t *shape, const int64_t *strides, float scale, float *out, int nthreads) {
    const int64_t B = shape[0], H = shape[1], Hkv = shape[2], Q = shape[3], K = shape[4], D = shape[5];
    if (Hkv <= 0 || H % Hkv || D <= 0 || K > INT32_MAX) return -1;
    const Ops *o = ops();
    const int grouped = o->group_scores[kind] != NULL;
    if (grouped && Q < WIDEN_QUERIES)
        return attention_grouped(o, q, k, v, mask, shape, strides, scale, out, nthreads, kind);
    const size_t nk = (size_t)(B * Hkv * K * D);
    float *kf = malloc(sizeof(float) * 2 * (nk ? nk : 1));
    if (kf == NULL)
        return grouped ? attention_grouped(o, q, k, v, mask, shape, strides, scale, out, nthreads, kind) : -2;
    float *vf = kf + nk;
    widen_rows(k, strides + 3, B, Hkv, K, D, kf, nthreads, kind);
    widen_rows(v, strides + 6, B, Hkv, K, D, vf, nthreads, kind);
    const int64_t wide[12] = {strides[0], strides[1], strides[2], Hkv * K * D, K * D, D, Hkv * K * D, K * D, D,
                              strides[9], strides[10], strides[11]};
    const int rc = mlm_attention(q, kf, vf, mask, shape, wide, scale, out, nthreads);
    free(kf);
    return rc;
}

int mlm_attention_kv16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, const int64_t *shape,
                       const int64_t *strides, float scale, float *out, int nthreads) {
    return attention_kv(1, q, k, v, mask, shape, strides, scale, out, nthreads);
}

int mlm_attention_kvf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask,
                        const int64_t *shape, const int64_t *strides, float scale, float *out, int nthreads) {
    return attention_kv(2, q, k, v, mask, shape, strides, scale, out, nthreads);
}

/* The grouped decode attention in pieces, for a caller that shares one query position's
 * key/value head among threads (step.c): scores over any range of the listed keys, the softmax,
 * and any range of the output's lanes starting at a multiple of 16 give attention_grouped's bits,
 * since each score, each exponential and each output lane is computed by the same operations in
 * the same order whatever the range and whichever heads share the call (up to GROUP_Q).
 * `mlm_attention_part_keys` lists a query's keys as attention lists them from a mask row.
 * `mlm_attention_parts` says whether the grouped kernels are what attention runs for a decode
 * step with keys and values of `kind` and `rep` heads a key/value head, on this CPU. */
int mlm_attention_parts(int kind, int64_t rep) {
    return kind >= 0 && kind <= 2 && rep >= 1 && ops()->group_scores[kind] != NULL && (kind != 0 || rep > 1);
}

int64_t mlm_attention_part_keys(const uint8_t *row, int64_t stride, int64_t K, int32_t *idx) {
    return masked_keys(row, stride, K, idx);
}

void mlm_attention_part_scores(int kind, const float *const *q, int R, const void *k, int64_t ks, const int32_t *idx,
                               int64_t n, int64_t D, float scale, float *const *s) {
    ops()->group_scores[kind](q, R, k, ks, idx, n, D, scale, s);
}

float mlm_attention_part_softmax(float *s, int64_t n) { return ops()->softmax(s, n); }

void mlm_attention_part_weighted(int kind, const float *const *p, const float *sums, int R, const void *v, int64_t vs,
                                 const int32_t *idx, int64_t n, int64_t D, float *const *out) {
    ops()->group_weighted[kind](p, sums, R, v, vs, idx, n, D, out);
}

/* float32 <-> float16 as the fused step writes and attention reads a float16 cache (the tests
 * compare them with torch's own conversions). */
void mlm_f32_to_f16(const float *x, int64_t n, uint16_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_f16(x[i]);
}

void mlm_f16_to_f32(const uint16_t *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(x[i]);
}

/* The row-wise kernels below run their rows in the calling thread without entering OpenMP at
 * all when they do not split them (the fused decode step's calls): even a region of one thread
 * costs 0.4-0.9 us to make and tear down.
 *
 * y[m] = w * rmsnorm(x[m]) for M rows of C values (row stride xs, unit stride within a row). */
void mlm_rmsnorm(const float *x, int64_t M, int64_t C, int64_t xs, const float *w, float eps, float *y,
                 int nthreads) {
    const Ops *o = ops();
    if (nthreads > 1 && M > 1 && M * C >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) o->rmsnorm_row(x + m * xs, w, C, eps, y + m * C);
    } else {
        for (int64_t m = 0; m < M; m++) o->rmsnorm_row(x + m * xs, w, C, eps, y + m * C);
    }
}

/* y[m] = silu(g[m]) * u[m] for M rows of N values (row strides gs, us; y contiguous). */
void mlm_silu_mul(const float *g, int64_t gs, const float *u, int64_t us, int64_t M, int64_t N, float *y,
                  int nthreads) {
    const Ops *o = ops();
    if (nthreads > 1 && M > 1 && M * N >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) o->silu_mul_row(g + m * gs, u + m * us, N, y + m * N);
    } else {
        for (int64_t m = 0; m < M; m++) o->silu_mul_row(g + m * gs, u + m * us, N, y + m * N);
    }
}

/* mlm_rmsnorm on bf16 x and w, y bf16: bf16(w * bf16(x * r)), r from the widened row as mlm_rmsnorm's. */
void mlm_rmsnorm_bf16(const uint16_t *x, int64_t M, int64_t C, int64_t xs, const uint16_t *w, float eps, uint16_t *y,
                      int nthreads) {
    const Ops *o = ops();
    if (nthreads > 1 && M > 1 && M * C >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) o->rmsnorm_row_bf16(x + m * xs, w, C, eps, y + m * C);
    } else {
        for (int64_t m = 0; m < M; m++) o->rmsnorm_row_bf16(x + m * xs, w, C, eps, y + m * C);
    }
}

/* mlm_silu_mul on bf16 g and u, y bf16: bf16(bf16(silu(g)) * u), silu as mlm_silu_mul's. */
void mlm_silu_mul_bf16(const uint16_t *g, int64_t gs, const uint16_t *u, int64_t us, int64_t M, int64_t N,
                       uint16_t *y, int nthreads) {
    const Ops *o = ops();
    if (nthreads > 1 && M > 1 && M * N >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) o->silu_mul_row_bf16(g + m * gs, u + m * us, N, y + m * N);
    } else {
        for (int64_t m = 0; m < M; m++) o->silu_mul_row_bf16(g + m * gs, u + m * us, N, y + m * N);
    }
}
