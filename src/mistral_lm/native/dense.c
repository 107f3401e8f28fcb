/* Batch-invariant bfloat16 and int8-weight linears for CPU decode (see dense.py).
 *
 *   mlm_bf16_linear: out[m, n] = bf16_rne(dot(x[m, :], w[n, :]))              w bfloat16
 *   mlm_int8_linear: out[m, n] = bf16_rne(dot(x[m, :], w[n, :]) * scale[n])    w int8, scale bfloat16
 *
 * x (M, K) and out (M, N) bfloat16, w (N, K). And mlm_int8_quantize, the int8 codes and scales
 * of a float weight (Int8Linear.from_linear), at the end of this file.
 *
 * The dot product has one fixed order, attention.c's dot_s: each bfloat16 is widened to float32
 * exactly (bits << 16); 16 float32 lane accumulators, lane l takes k = l, l+16, l+32, ... in
 * increasing k with fma (a product of two bfloat16 is exact in float32 unless it under- or
 * overflows, so fma == mul + add on ordinary data; every path uses fma, so they agree on all data;
 * the zero padding of a last partial chunk adds +0, which changes nothing as an accumulator that
 * starts at +0 is never -0), then one tree: l + l+8, + l+4, + l+2, + l+1. The float32 sum is
 * rounded to bfloat16 as c10::BFloat16 does (NaN -> 0x7FC0, else round to nearest even).
 *
 * int8 weights take the same dot with (float)w[k] for the weight: a bfloat16 (8 significant bits)
 * times an int8 (at most 8) is as exact in float32 as a product of two bfloat16, so every path's
 * fma again equals mul + add; the float32 dot is then multiplied once by float(scale[n]) (one
 * rounding) and rounded to bfloat16. Int8Linear's decode path relies on these bits.
 *
 * So out[m, n] depends only on x[m] and w[n]: not on M, the thread count, or which slice of N a
 * call computes (the fused decode step calls it per thread on row slices of w). The AVX-512, AVX2
 * (two 8-lane halves = the 16 lanes) and scalar paths perform exactly these operations, so all
 * three give bit-identical results.
 *
 * Speed: decode reads each weight once from DRAM, so the kernels stream every weight row once for
 * all (up to 8) activation rows, several weight rows at a time (independent chains, more loads in
 * flight) and prefetch each row's stream PREFETCH_AHEAD bytes ahead into L2 (_MM_HINT_T1; an extra
 * prefetch into L1 made it slower here, as for ggml.c). Prefetching along each row's own stream
 * rather than the flat address lifted one thread's cold rate from ~18 to ~22 GB/s (49152 x 576)
 * and from ~18 to ~35 GB/s (1536 x 576, 30 matrices in turn). int8 rows share the same tiles and
 * prefetch (64 bytes of a row per step); each 16 weights cost a sign-extend, a convert and an fma,
 * which bounds one thread near 20 GB/s cold, against 7 GB/s for torch's _weight_int8pack_mm (eight
 * rows per group instead of four measured the same cold).
 *
 * Contraction of a*b+c into fma is switched off: every fma here is written out.
 */
#pragma GCC optimize("fp-contract=off")
#include <immintrin.h>
#include "float_common.h"
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define AI inline __attribute__((always_inline))

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096 /* bytes along each row; 1-2 KiB measured slower here, 8 KiB alike */
#endif
#define MB_MAX 8           /* activation rows that share one pass over the weights */
#define PARALLEL_MIN 65536 /* N * K below which a fork costs more than a second core gives */

static int isa_level = -1;

/* Weight element widths in bytes, a constant at every call site (the kernels are inlined per width):
 * WB_BF16 rows are bfloat16, WB_I8 rows int8 with a bfloat16 scale per row. */
#define WB_BF16 2
#define WB_I8 1

/* Where a group of R weight rows prefetches: PREFETCH_AHEAD bytes further along each row, wrapping
 * past a row's end into the same row of a later group (R rows on), so every row's stream has the
 * same lead and the next group's rows do not start on demand misses (a 576-wide bfloat16 row is
 * 1152 bytes). WB: bytes per weight. */
typedef struct {
    int64_t row, off; /* bytes from the group's row r: whole groups ahead, and within the row */
} Ahead;

static inline Ahead ahead_start(const int WB, int64_t K, int64_t ldw, int R) {
    const int64_t rowb = K * WB > 64 ? K * WB : 64;
    return (Ahead){(PREFETCH_AHEAD / rowb) * R * ldw * WB, PREFETCH_AHEAD % rowb};
}

static inline void ahead_step(const int WB, Ahead *a, int64_t K, int64_t ldw, int R) { /* 64 bytes on */
    const int64_t rowb = K * WB > 64 ? K * WB : 64;
    a->off += 64;
    if (a->off >= rowb) {
        a->off -= rowb;
        a->row += R * ldw * WB;
    }
}

/* the row's output: the dot itself (bfloat16 weights), or times the row's scale (int8) */
static inline uint16_t finish(const int WB, float dot, const uint16_t *scale) {
    return f32_to_bf16(WB == WB_I8 ? dot * bf16_to_f32(*scale) : dot);
}

/* row n's scale (bfloat16 weights have none: their NULL is never offset) */
static inline const uint16_t *scale_at(const int WB, const uint16_t *scale, int64_t n) {
    return WB == WB_I8 ? scale + n : NULL;
}

/* ================================================================ scalar: the definition */
/* weight i of a row as float32 (exact for both widths) */
static inline float wval(const int WB, const void *w, int64_t i) {
    return WB == WB_I8 ? (float)((const int8_t *)w)[i] : bf16_to_f32(((const uint16_t *)w)[i]);
}

static inline float dot_s(const int WB, const uint16_t *x, const void *w, int64_t K) {
    float acc[16] = {0};
    for (int64_t k = 0; k < K; k += 16)
        for (int l = 0; l < 16; l++) {
            const int in = k + l < K;
            acc[l] = fmaf(in ? bf16_to_f32(x[k + l]) : 0.0f, in ? wval(WB, w, k + l) : 0.0f, acc[l]);
        }
    return tree16(acc);
}

static inline void rows_s(const int WB, const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const void *w,
                          int64_t ldw, const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * ldo + n] =
                finish(WB, dot_s(WB, x + m * ldx, (const char *)w + n * ldw * WB, K), scale_at(WB, scale, n));
}

/* ================================================================ AVX-512 */
/* 16 bfloat16 -> float32: each word to the high half of its lane, zeros below (one vpermw; the
 * zero-extend-and-shift pair took measurably longer with the weights in cache) */
T512 static AI __m512 widen512(__m256i b) {
    const __m512i idx = _mm512_set_epi16(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5,
                                         4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, _mm512_castsi256_si512(b)));
}

T512 static AI __m512 load512(const uint16_t *p) { return widen512(_mm256_loadu_si256((const __m256i *)p)); }

T512 static AI __m512 loadm512(const uint16_t *p, __mmask16 m) { return widen512(_mm256_maskz_loadu_epi16(m, p)); }

/* 16 weights from element i of a row, all of them or those in mask m (zeros elsewhere) */
T512 static AI __m512 wload512(const int WB, const void *w, int64_t i) {
    if (WB == WB_BF16) return load512((const uint16_t *)w + i);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
}

T512 static AI __m512 wloadm512(const int WB, const void *w, int64_t i, __mmask16 m) {
    if (WB == WB_BF16) return loadm512((const uint16_t *)w + i, m);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)w + i)));
}

/* MB activation rows times R weight rows (w0, w0 + ldw, ...): MB * R independent 16-lane chains
 * over one pass of the R rows, prefetching 64 bytes of each row per step (64 / WB weights). MB, R
 * and WB are constants at every call site (always inlined). */
T512 static AI void group512(const int MB, const int R, const int WB, const uint16_t *x, int64_t ldx, int64_t K,
                             const void *w0, int64_t ldw, const uint16_t *scale, uint16_t *out, int64_t ldo) {
    const char *wb = w0;
    const int STEP = 64 / WB;
    __m512 acc[4][MB_MAX];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();
    Ahead pf = ahead_start(WB, K, ldw, R);
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) _mm_prefetch(wb + r * ldw * WB + pf.row + pf.off, _MM_HINT_T1);
        ahead_step(WB, &pf, K, ldw, R);
#pragma GCC unroll 4
        for (int h = 0; h < STEP; h += 16) {
            __m512 wv[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) wv[r] = wload512(WB, wb + r * ldw * WB, k + h);
#pragma GCC unroll 8
            for (int m = 0; m < MB; m++) {
                const __m512 xv = load512(x + m * ldx + k + h);
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
            }
        }
    }
    for (; k < K; k += 16) {
        const __mmask16 t = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = wloadm512(WB, wb + r * ldw * WB, k, t);
#pragma GCC unroll 8
        for (int m = 0; m < MB; m++) {
            const __m512 xv = loadm512(x + m * ldx + k, t);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(xv, wv[r], acc[r][m]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < MB; m++) out[m * ldo + r] = finish(WB, hsum512(acc[r][m]), scale_at(WB, scale, r));
}

T512 static AI void tile512(const int MB, const int R, const int WB, const uint16_t *x, int64_t ldx, int64_t K,
                            const void *w, int64_t ldw, const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out,
                            int64_t ldo) {
    const char *wb = w;
    int64_t n = n0;
    for (; n + R <= n1; n += R)
        group512(MB, R, WB, x, ldx, K, wb + n * ldw * WB, ldw, scale_at(WB, scale, n), out + n, ldo);
    for (; n < n1; n++) group512(MB, 1, WB, x, ldx, K, wb + n * ldw * WB, ldw, scale_at(WB, scale, n), out + n, ldo);
}

/* rows per weight group: four for few activation rows (more loads in flight), fewer where MB * R
 * chains would spill the 32 registers; one function per width (tile512_ bfloat16, tile512q int8) */
#define TILE512(MB, R)                                                                                                \
    T512 static void tile512_##MB(const uint16_t *x, int64_t ldx, int64_t K, const void *w, int64_t ldw,             \
                                  const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        tile512(MB, R, WB_BF16, x, ldx, K, w, ldw, scale, n0, n1, out, ldo);                                        \
    }                                                                                                               \
    T512 static void tile512q##MB(const uint16_t *x, int64_t ldx, int64_t K, const void *w, int64_t ldw,             \
                                  const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        tile512(MB, R, WB_I8, x, ldx, K, w, ldw, scale, n0, n1, out, ldo);                                          \
    }
TILE512(1, 4)
TILE512(2, 4)
TILE512(3, 4)
TILE512(4, 4)
TILE512(5, 3)
TILE512(6, 3)
TILE512(7, 3)
TILE512(8, 2)

typedef void (*tile_fn)(const uint16_t *, int64_t, int64_t, const void *, int64_t, const uint16_t *, int64_t, int64_t,
                        uint16_t *, int64_t);
static const tile_fn TILES512[MB_MAX + 1] = {NULL,       tile512_1, tile512_2, tile512_3, tile512_4,
                                             tile512_5, tile512_6, tile512_7, tile512_8};
static const tile_fn TILES512Q[MB_MAX + 1] = {NULL,       tile512q1, tile512q2, tile512q3, tile512q4,
                                              tile512q5, tile512q6, tile512q7, tile512q8};

/* all M rows, in blocks of up to `mb_max` sharing one pass over the weight rows [n0, n1) */
static void by_blocks(const tile_fn *tiles, int64_t mb_max, const uint16_t *x, int64_t M, int64_t K, int64_t ldx,
                      const void *w, int64_t ldw, const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out,
                      int64_t ldo) {
    for (int64_t m = 0; m < M; m += mb_max) {
        const int64_t mb = M - m < mb_max ? M - m : mb_max;
        tiles[mb](x + m * ldx, ldx, K, w, ldw, scale, n0, n1, out + m * ldo, ldo);
    }
}

/* ================================================================ AVX2: the 16 lanes as two halves */
T256 static AI __m256 load256(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 weights from element i of a row */
T256 static AI __m256 wload256(const int WB, const void *w, int64_t i) {
    if (WB == WB_BF16) return load256((const uint16_t *)w + i);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
}

/* a last partial chunk of 16 elements of `eb` bytes, zero-padded (AVX2 has no 8/16-bit masked load) */
static AI void pad16(const void *p, int64_t left, int eb, uint16_t buf[16]) {
    memset(buf, 0, 32);
    memcpy(buf, p, (size_t)(left * eb));
}

T256 static AI void group256(const int MB, const int R, const int WB, const uint16_t *x, int64_t ldx, int64_t K,
                             const void *w0, int64_t ldw, const uint16_t *scale, uint16_t *out, int64_t ldo) {
    const char *wb = w0;
    const int64_t STEP = 64 / WB; /* weights per 64 bytes: one prefetch per row per STEP */
    __m256 lo[2][4], hi[2][4]; /* [r][m]: 2 * R * MB accumulators, <= 8 of the 16 registers */
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++) lo[r][m] = hi[r][m] = _mm256_setzero_ps();
    const int64_t kf = K & ~(int64_t)15;
    Ahead pf = ahead_start(WB, K, ldw, R);
    for (int64_t k = 0; k < kf; k += 16) {
        if ((k & (STEP - 1)) == 0) {
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) _mm_prefetch(wb + r * ldw * WB + pf.row + pf.off, _MM_HINT_T1);
            ahead_step(WB, &pf, K, ldw, R);
        }
        __m256 wl[2], wh[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            wl[r] = wload256(WB, wb + r * ldw * WB, k);
            wh[r] = wload256(WB, wb + r * ldw * WB, k + 8);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++) {
            const __m256 xl = load256(x + m * ldx + k), xh = load256(x + m * ldx + k + 8);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                lo[r][m] = _mm256_fmadd_ps(xl, wl[r], lo[r][m]);
                hi[r][m] = _mm256_fmadd_ps(xh, wh[r], hi[r][m]);
            }
        }
    }
    if (kf < K) {
        uint16_t wpad[2][16], xb[16];
        __m256 wl[2], wh[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            pad16(wb + (r * ldw + kf) * WB, K - kf, WB, wpad[r]);
            wl[r] = wload256(WB, wpad[r], 0);
            wh[r] = wload256(WB, wpad[r], 8);
        }
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++) {
            pad16(x + m * ldx + kf, K - kf, 2, xb);
            const __m256 xl = load256(xb), xh = load256(xb + 8);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                lo[r][m] = _mm256_fmadd_ps(xl, wl[r], lo[r][m]);
                hi[r][m] = _mm256_fmadd_ps(xh, wh[r], hi[r][m]);
            }
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int m = 0; m < MB; m++)
            out[m * ldo + r] = finish(WB, hsum256x2(lo[r][m], hi[r][m]), scale_at(WB, scale, r));
}

T256 static AI void tile256(const int MB, const int R, const int WB, const uint16_t *x, int64_t ldx, int64_t K,
                            const void *w, int64_t ldw, const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out,
                            int64_t ldo) {
    const char *wb = w;
    int64_t n = n0;
    for (; n + R <= n1; n += R)
        group256(MB, R, WB, x, ldx, K, wb + n * ldw * WB, ldw, scale_at(WB, scale, n), out + n, ldo);
    for (; n < n1; n++) group256(MB, 1, WB, x, ldx, K, wb + n * ldw * WB, ldw, scale_at(WB, scale, n), out + n, ldo);
}

#define TILE256(MB, R)                                                                                                \
    T256 static void tile256_##MB(const uint16_t *x, int64_t ldx, int64_t K, const void *w, int64_t ldw,             \
                                  const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        tile256(MB, R, WB_BF16, x, ldx, K, w, ldw, scale, n0, n1, out, ldo);                                        \
    }                                                                                                               \
    T256 static void tile256q##MB(const uint16_t *x, int64_t ldx, int64_t K, const void *w, int64_t ldw,             \
                                  const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        tile256(MB, R, WB_I8, x, ldx, K, w, ldw, scale, n0, n1, out, ldo);                                          \
    }
TILE256(1, 2)
TILE256(2, 2)
TILE256(3, 1)
TILE256(4, 1)

static const tile_fn TILES256[5] = {NULL, tile256_1, tile256_2, tile256_3, tile256_4};
static const tile_fn TILES256Q[5] = {NULL, tile256q1, tile256q2, tile256q3, tile256q4};

/* ================================================================ dispatch */
typedef void (*rows_fn)(const uint16_t *, int64_t, int64_t, int64_t, const void *, int64_t, const uint16_t *, int64_t,
                        int64_t, uint16_t *, int64_t);

#define ROWS_FNS(SUFFIX, WB, T512S, T256S)                                                                         \
    static void rows_s##SUFFIX(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t ldw,   \
                               const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {        \
        rows_s(WB, x, M, K, ldx, w, ldw, scale, n0, n1, out, ldo);                                                 \
    }                                                                                                              \
    static void rows256##SUFFIX(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t ldw,  \
                                const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        by_blocks(T256S, 4, x, M, K, ldx, w, ldw, scale, n0, n1, out, ldo);                                        \
    }                                                                                                              \
    static void rows512##SUFFIX(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t ldw,  \
                                const uint16_t *scale, int64_t n0, int64_t n1, uint16_t *out, int64_t ldo) {       \
        by_blocks(T512S, MB_MAX, x, M, K, ldx, w, ldw, scale, n0, n1, out, ldo);                                   \
    }
ROWS_FNS(_bf16, WB_BF16, TILES512, TILES256)
ROWS_FNS(_i8, WB_I8, TILES512Q, TILES256Q)
static const rows_fn ROWS_BF16[3] = {rows_s_bf16, rows256_bf16, rows512_bf16};
static const rows_fn ROWS_I8[3] = {rows_s_i8, rows256_i8, rows512_i8};

int mlm_set_isa(int cap) {
    isa_level = capped_isa_level(cap);
    return isa_level;
}

/* Both linears once the arguments are checked: one thread, or (big enough) contiguous slices of
 * whole 4-row groups, so each thread streams its own part of w. */
static void run(const rows_fn rows, const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const void *w, int64_t N,
                int64_t ldw, const uint16_t *scale, uint16_t *out, int64_t ldo, int nthreads) {
    const int nt = nthreads < 1 ? 1 : nthreads;
    if (nt == 1 || N < 2 * 4 || N * K < PARALLEL_MIN) {
        rows(x, M, K, ldx, w, ldw, scale, 0, N, out, ldo);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t per = ((N + T - 1) / T + 3) & ~(int64_t)3;
        const int64_t n0 = t * per < N ? t * per : N, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) rows(x, M, K, ldx, w, ldw, scale, n0, n1, out, ldo);
    }
}

static int bad_shape(int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t ldw, int64_t ldo) {
    return M < 0 || K < 0 || N < 0 || (M > 1 && ldx < K) || (N > 1 && ldw < K) || (M > 1 && ldo < N);
}

/* out[m * ldo + n] = bf16(dot(x[m * ldx + :K], w[n * ldw + :K])) for m < M, n < N (strides in
 * elements, unit stride along K). nthreads < 1 counts as 1. Returns 0, or -1 on bad arguments. */
int mlm_bf16_linear(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *w, int64_t N, int64_t ldw,
                    uint16_t *out, int64_t ldo, int nthreads) {
    if (bad_shape(M, K, ldx, N, ldw, ldo)) return -1;
    if (M == 0 || N == 0) return 0;
    if (out == NULL || (K > 0 && (x == NULL || w == NULL))) return -1;
    if (isa_level < 0) mlm_set_isa(2);
    run(ROWS_BF16[isa_level], x, M, K, ldx, w, N, ldw, NULL, out, ldo, nthreads);
    return 0;
}

/* out[m * ldo + n] = bf16(dot(x[m * ldx + :K], w[n * ldw + :K]) * scale[n]) for m < M, n < N: w int8
 * (ldw in elements = bytes, unit stride along K), scale (N,) bfloat16, the dot as mlm_bf16_linear's.
 * nthreads < 1 counts as 1. Returns 0, or -1 on bad arguments. */
int mlm_int8_linear(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const int8_t *w, int64_t N, int64_t ldw,
                    const uint16_t *scale, uint16_t *out, int64_t ldo, int nthreads) {
    if (bad_shape(M, K, ldx, N, ldw, ldo)) return -1;
    if (M == 0 || N == 0) return 0;
    if (out == NULL || scale == NULL || (K > 0 && (x == NULL || w == NULL))) return -1;
    if (isa_level < 0) mlm_set_isa(2);
    run(ROWS_I8[isa_level], x, M, K, ldx, w, N, ldw, scale, out, ldo, nthreads);
    return 0;
}

/* ================================================================ int8 quantization (Int8Linear.from_linear)
 *
 * quantization.functional.quantize_int8, the definition in torch, row by row in two passes over the
 * row instead of six over the whole weight:
 *   absmax = max |w[n, k]|;  s = (absmax > 0 ? absmax / 127 : 1) rounded to the scale's dtype;
 *   q[n, k] = (int8)clamp(rint(w[n, k] / s), -127, 127)   (w widened exactly to float32, the division
 *   and rint in float32, ties to even, as torch's div_ and round_)
 * A row holding a NaN or an infinity, or whose scale rounds to 0 or infinity in float16, is not
 * quantized: the call returns 1 and the caller keeps the definition's answer for such data. */
static AI int8_t qcode(float x, float s) {
    float r = rintf(x / s);
    r = r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r);
    return (int8_t)(int)r;
}

/* the row's largest |w| and whether any element is NaN or infinite, from k0 on (a SIMD pass did the rest) */
static AI float qmax_s(const void *w, int wt, int64_t k0, int64_t K, float m, int *bad) {
    for (int64_t k = k0; k < K; k++) {
        const float a = fabsf(widen_at(w, wt, k));
        if (!(a <= 3.402823466e38f)) *bad = 1;
        m = a > m ? a : m;
    }
    return m;
}

T512 static AI __m512 qload512(const void *w, int wt, int64_t k, __mmask16 mask) {
    if (wt == DT_F32) return _mm512_maskz_loadu_ps(mask, (const float *)w + k);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)w + k);
    if (wt == DT_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

T256 static AI __m256 qload256(const void *w, int wt, int64_t k) {
    if (wt == DT_F32) return _mm256_loadu_ps((const float *)w + k);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + k));
    if (wt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

T512 static float qmax512(const void *w, int wt, int64_t K, int *bad) {
    __m512 m = _mm512_setzero_ps();
    const __m512 big = _mm512_set1_ps(3.402823466e38f);
    __mmask16 nonfinite = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 a = _mm512_abs_ps(qload512(w, wt, k, mask));
        nonfinite |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        m = _mm512_max_ps(m, a);
    }
    if (nonfinite) *bad = 1;
    return _mm512_reduce_max_ps(m);
}

T512 static void qrow512(const void *w, int wt, int64_t K, float s, int8_t *q) {
    const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(qload512(w, wt, k, mask), sv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
        _mm512_mask_cvtsepi32_storeu_epi8(q + k, mask, _mm512_cvtps_epi32(r));
    }
}

T256 static float qmax256(const void *w, int wt, int64_t K, int *bad) {
    __m256 m = _mm256_setzero_ps();
    const __m256 big = _mm256_set1_ps(3.402823466e38f), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    int nonfinite = 0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 a = _mm256_and_ps(qload256(w, wt, k), absmask);
        nonfinite |= _mm256_movemask_ps(_mm256_cmp_ps(a, big, _CMP_NLE_UQ));
        m = _mm256_max_ps(m, a);
    }
    float lanes[8], best = 0.0f;
    _mm256_storeu_ps(lanes, m);
    for (int l = 0; l < 8; l++) best = lanes[l] > best ? lanes[l] : best;
    if (nonfinite) *bad = 1;
    return qmax_s(w, wt, k, K, best, bad);
}

T256 static void qrow256(const void *w, int wt, int64_t K, float s, int8_t *q) {
    const __m256 sv = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(qload256(w, wt, k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
        const __m256i i = _mm256_cvtps_epi32(r);
        const __m128i s16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i *)(q + k), _mm_packs_epi16(s16, s16));
    }
    for (; k < K; k++) q[k] = qcode(widen_at(w, wt, k), s);
}

/* The stored scale for absmax in dtype st (bits written to *out), as a float; 0 where it rounds to 0 or
 * infinity in float16 (the caller then gives the row to the definition). */
static float qscale(float absmax, int st, void *out, int64_t n) {
    const float s = absmax > 0.0f ? absmax / 127.0f : 1.0f;
    if (st == DT_F32) {
        ((float *)out)[n] = s;
        return s;
    }
    const uint16_t h = st == DT_BF16 ? f32_to_bf16(s) : f32_to_f16(s);
    ((uint16_t *)out)[n] = h;
    const float r = st == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
    return r > 0.0f && r <= 3.402823466e38f ? r : 0.0f;
}

/* w (N, K) in dtype wt (row stride ldw elements, unit stride along K) -> q (N, K) int8 (contiguous) and
 * scale (N,) in dtype st. Returns 0, 1 if some row is left to the definition (see above; q and scale
 * are then incomplete), or -1 on bad arguments. */
int mlm_int8_quantize(const void *w, int wt, int64_t N, int64_t K, int64_t ldw, int8_t *q, void *scale, int st,
                      int nthreads) {
    if (N < 0 || K < 0 || (N > 1 && ldw < K) || wt < DT_F32 || wt > DT_F16 || st < DT_F32 || st > DT_F16) return -1;
    if (N == 0) return 0;
    if (q == NULL || scale == NULL || (K > 0 && w == NULL)) return -1;
    if (isa_level < 0) mlm_set_isa(2);
    const int level = isa_level, nt = nthreads < 1 || N * K < PARALLEL_MIN ? 1 : nthreads;
    const int64_t eb = wt == DT_F32 ? 4 : 2;
    int refused = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : refused)
    for (int64_t n = 0; n < N; n++) {
        const void *row = (const char *)w + n * ldw * eb;
        int bad = 0;
        const float absmax = level >= 2 ? qmax512(row, wt, K, &bad)
                             : level == 1 ? qmax256(row, wt, K, &bad) : qmax_s(row, wt, 0, K, 0.0f, &bad);
        const float s = bad ? 0.0f : qscale(absmax, st, scale, n);
        if (s == 0.0f) {
            refused |= 1;
            continue;
        }
        int8_t *out = q + n * K;
        if (level >= 2) qrow512(row, wt, K, s, out);
        else if (level == 1) qrow256(row, wt, K, s, out);
        else
            for (int64_t k = 0; k < K; k++) out[k] = qcode(widen_at(row, wt, k), s);
    }
    return refused;
}
