/* bitsandbytes' 4-bit formats (NF4, FP4) on the CPU: y = x @ W.T with W decoded in registers.

   Storage (NF4Linear's buffers): `packed` (N, K/2) bytes, the even k in the high nibble, and
   `absmax` (N, K/blocksize) float32. A weight is w = fp32(codebook[q] * absmax[n, g]), exactly
   what NF4Linear.dequantize() returns: per block, the 16-entry codebook is scaled once and the
   codes index that scaled table (AVX-512: one vpermps of 16 floats; AVX2: two 8-float
   permutes and a blend), then a float32 FMA with the activations.

   Lanes hold a chunk of 2L consecutive k (L = 16 floats for AVX-512, 8 for AVX2, 1 scalar):
   the bytes' high nibbles are the chunk's even k and the low nibbles its odd k, so x is copied
   once per call into the same order (float32, even k of the chunk then odd k).

   Batch invariance: every (m, n) has its own two accumulators (even / odd k) that see the
   chunks in k order, whatever the tile it is computed in, the thread that computes it and the
   other rows of the call; so out[m, n] is bit-identical for any M, N slice or thread count. The
   instruction set does change the summation order: results agree across ISAs only up to float
   rounding. */

#include "float_common.h"
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int isa_best(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_SCALAR;
}

static int isa = -1;

int mlm_set_isa(int cap) {
    int best = isa_best();
    isa = cap < 0 ? ISA_SCALAR : (cap < best ? cap : best);
    return isa;
}

static inline int isa_now(void) {
    if (isa < 0)
        mlm_set_isa(ISA_AVX512);
    return isa;
}

static inline void store(void *out, int dtype, int64_t i, float v) {
    if (dtype == DT_BF16)
        ((uint16_t *)out)[i] = f32_to_bf16(v);
    else
        ((float *)out)[i] = v;
}

/* x (M, K) in `dtype` -> float32 in chunk order: per 2L k, the L even ones then the L odd ones. */
static void prepare_x(const void *x, int dtype, int64_t M, int64_t K, int lanes, float *xp) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 2 * lanes)
            for (int j = 0; j < 2 * lanes; j++) {
                int64_t k = m * K + c + 2 * (j % lanes) + j / lanes;
                xp[m * K + c + j] = dtype == DT_BF16 ? bf16_to_f32(((const uint16_t *)x)[k]) : ((const float *)x)[k];
            }
}

typedef struct {
    const float *xp;       /* (M, K) float32 in chunk order */
    const uint8_t *packed; /* (N, K/2) */
    const float *absmax;   /* (N, K/bs) */
    const float *codebook; /* (16,) */
    void *out;             /* (M, N) in out_dtype */
    int64_t M, N, K;
    int bs, out_dtype;
} Problem;

/* ------------------------------------------------------------------ scalar */
static void tile_scalar(const Problem *p, int64_t m0, int mr, int64_t n0, int nr) {
    const int64_t half = p->K / 2, groups = p->K / p->bs;
    for (int i = 0; i < mr; i++)
        for (int r = 0; r < nr; r++) {
            const float *x = p->xp + (m0 + i) * p->K;
            const uint8_t *q = p->packed + (n0 + r) * half;
            float even = 0.0f, odd = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                float table[16], s = p->absmax[(n0 + r) * groups + g];
                for (int t = 0; t < 16; t++)
                    table[t] = p->codebook[t] * s;
                for (int64_t j = g * p->bs / 2; j < (g + 1) * p->bs / 2; j++) {
                    even += x[2 * j] * table[q[j] >> 4];
                    odd += x[2 * j + 1] * table[q[j] & 15];
                }
            }
            store(p->out, p->out_dtype, (m0 + i) * p->N + n0 + r, even + odd);
        }
}

/* ------------------------------------------------------------------ AVX2 */
#define AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define AVX2_FN __attribute__((target("avx2,fma,f16c"))) static

AVX2 __m256 lookup8(__m256i idx, __m256 lo, __m256 hi) { /* table[idx & 15] of a 16-float table */
    __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), bit3);
}

AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define AVX2_TILE(MR, NR)                                                                          \
    AVX2_FN void tile_avx2_##MR##_##NR(const Problem *p, int64_t m0, int64_t n0) {                 \
        const int64_t half = p->K / 2, groups = p->K / p->bs;                                     \
        const __m256 cb_lo = _mm256_loadu_ps(p->codebook), cb_hi = _mm256_loadu_ps(p->codebook + 8); \
        __m256 ev[MR][NR], od[MR][NR];                                                            \
        for (int i = 0; i < MR; i++)                                                              \
            for (int r = 0; r < NR; r++)                                                          \
                ev[i][r] = od[i][r] = _mm256_setzero_ps();                                        \
        for (int64_t g = 0; g < groups; g++) {                                                    \
            __m256 lo[NR], hi[NR];                                                                \
            for (int r = 0; r < NR; r++) {                                                        \
                __m256 s = _mm256_broadcast_ss(p->absmax + (n0 + r) * groups + g);               \
                lo[r] = _mm256_mul_ps(cb_lo, s);                                                  \
                hi[r] = _mm256_mul_ps(cb_hi, s);                                                  \
            }                                                                                     \
            for (int64_t c = g * p->bs; c < (g + 1) * p->bs; c += 16) {                           \
                __m256 we[NR], wo[NR];                                                            \
                for (int r = 0; r < NR; r++) {                                                    \
                    __m128i b = _mm_loadl_epi64((const __m128i *)(p->packed + (n0 + r) * half + c / 2)); \
                    __m256i v = _mm256_cvtepu8_epi32(b);                                          \
                    we[r] = lookup8(_mm256_srli_epi32(v, 4), lo[r], hi[r]);                      \
                    wo[r] = lookup8(v, lo[r], hi[r]);                                             \
                }                                                                                 \
                for (int i = 0; i < MR; i++) {                                                    \
                    const float *x = p->xp + (m0 + i) * p->K + c;                                 \
                    __m256 xe = _mm256_loadu_ps(x), xo = _mm256_loadu_ps(x + 8);                  \
                    for (int r = 0; r < NR; r++) {                                                \
                        ev[i][r] = _mm256_fmadd_ps(xe, we[r], ev[i][r]);                          \
                        od[i][r] = _mm256_fmadd_ps(xo, wo[r], od[i][r]);                          \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < MR; i++)                                                              \
            for (int r = 0; r < NR; r++)                                                          \
                store(p->out, p->out_dtype, (m0 + i) * p->N + n0 + r, hsum8(_mm256_add_ps(ev[i][r], od[i][r]))); \
    }

AVX2_TILE(1, 1)
AVX2_TILE(2, 1)
AVX2_TILE(1, 2)
AVX2_TILE(2, 2)

static void tile_avx2(const Problem *p, int64_t m0, int mr, int64_t n0, int nr) {
    for (; mr >= 2; mr -= 2, m0 += 2)
        nr == 2 ? tile_avx2_2_2(p, m0, n0) : tile_avx2_2_1(p, m0, n0);
    if (mr)
        nr == 2 ? tile_avx2_1_2(p, m0, n0) : tile_avx2_1_1(p, m0, n0);
}

/* ------------------------------------------------------------------ AVX-512 */
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl"))) static

#define AVX512_TILE(MR, NR)                                                                        \
    AVX512_FN void tile_avx512_##MR##_##NR(const Problem *p, int64_t m0, int64_t n0) {             \
        const int64_t half = p->K / 2, groups = p->K / p->bs;                                     \
        const __m512 cb = _mm512_loadu_ps(p->codebook);                                           \
        __m512 ev[MR][NR], od[MR][NR];                                                            \
        for (int i = 0; i < MR; i++)                                                              \
            for (int r = 0; r < NR; r++)                                                          \
                ev[i][r] = od[i][r] = _mm512_setzero_ps();                                        \
        for (int64_t g = 0; g < groups; g++) {                                                    \
            __m512 table[NR];                                                                     \
            for (int r = 0; r < NR; r++)                                                          \
                table[r] = _mm512_mul_ps(cb, _mm512_set1_ps(p->absmax[(n0 + r) * groups + g]));  \
            for (int64_t c = g * p->bs; c < (g + 1) * p->bs; c += 32) {                           \
                __m512 xe[MR], xo[MR];                                                            \
                for (int i = 0; i < MR; i++) {                                                    \
                    xe[i] = _mm512_loadu_ps(p->xp + (m0 + i) * p->K + c);                         \
                    xo[i] = _mm512_loadu_ps(p->xp + (m0 + i) * p->K + c + 16);                    \
                }                                                                                 \
                for (int r = 0; r < NR; r++) {                                                    \
                    __m128i b = _mm_loadu_si128((const __m128i *)(p->packed + (n0 + r) * half + c / 2)); \
                    __m512i v = _mm512_cvtepu8_epi32(b);                                          \
                    __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);        \
                    __m512 wo = _mm512_permutexvar_ps(v, table[r]); /* uses the low 4 bits only */ \
                    for (int i = 0; i < MR; i++) {                                                \
                        ev[i][r] = _mm512_fmadd_ps(xe[i], we, ev[i][r]);                          \
                        od[i][r] = _mm512_fmadd_ps(xo[i], wo, od[i][r]);                          \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        for (int i = 0; i < MR; i++)                                                              \
            for (int r = 0; r < NR; r++)                                                          \
                store(p->out, p->out_dtype, (m0 + i) * p->N + n0 + r,                             \
                      _mm512_reduce_add_ps(_mm512_add_ps(ev[i][r], od[i][r])));                   \
    }

AVX512_TILE(1, 1)
AVX512_TILE(2, 1)
AVX512_TILE(3, 1)
AVX512_TILE(4, 1)
AVX512_TILE(1, 4)
AVX512_TILE(1, 2)
AVX512_TILE(2, 2)
AVX512_TILE(3, 2)
AVX512_TILE(4, 2)

/* rows m0.. m0+mr of x times rows n0.. n0+nr of W; nr is 1, 2, or 4 (then mr is 1) */
static void tile_avx512(const Problem *p, int64_t m0, int mr, int64_t n0, int nr) {
    typedef void (*Tile)(const Problem *, int64_t, int64_t);
    static const Tile tiles[2][4] = {{tile_avx512_1_1, tile_avx512_2_1, tile_avx512_3_1, tile_avx512_4_1},
                                     {tile_avx512_1_2, tile_avx512_2_2, tile_avx512_3_2, tile_avx512_4_2}};
    if (nr == 4) {
        tile_avx512_1_4(p, m0, n0);
        return;
    }
    for (; mr > 0; mr -= 4, m0 += 4)
        tiles[nr - 1][(mr < 4 ? mr : 4) - 1](p, m0, n0);
}

/* ------------------------------------------------------------------ entry points */
static int lanes_of(int level) { return level == ISA_AVX512 ? 16 : level == ISA_AVX2 ? 8 : 1; }

/* Part `part` of `parts`: a contiguous run of the N tiles, once per strip of 4 rows of x. */
static void tile_run(void (*tile)(const Problem *, int64_t, int, int64_t, int), const Problem *p, int nr, int64_t tiles,
                     int64_t part, int64_t parts) {
    const int64_t first = tiles * part / parts, last = tiles * (part + 1) / parts;
    for (int64_t m0 = 0; m0 < p->M; m0 += 4) {
        const int mr = p->M - m0 < 4 ? (int)(p->M - m0) : 4;
        for (int64_t t = first; t < last; t++) {
            if (t * nr + nr <= p->N)
                tile(p, m0, mr, t * nr, nr);
            else
                for (int64_t n = t * nr; n < p->N; n++)
                    tile(p, m0, mr, n, 1);
        }
    }
}

/* out (M, N) = x (M, K) @ W.T; x and out are float32 or bfloat16 (`x_dtype`, `out_dtype`:
   0 float32, 1 bfloat16). K must be a multiple of blocksize, blocksize a multiple of 32.
   Returns 0, or -1 when scratch memory cannot be had. */
int mlm_nf4_mm(const void *x, int x_dtype, const uint8_t *packed, const float *absmax, const float *codebook,
               void *out, int out_dtype, int64_t M, int64_t N, int64_t K, int blocksize, int threads) {
    const int level = isa_now(), lanes = lanes_of(level);
    if (M == 0 || N == 0)
        return 0;
    float *xp = aligned_alloc(64, ((size_t)(M * K) * sizeof(float) + 63) / 64 * 64);
    if (xp == NULL)
        return -1;
    prepare_x(x, x_dtype, M, K, lanes, xp);
    const Problem p = {xp, packed, absmax, codebook, out, M, N, K, blocksize, out_dtype};
    void (*tile)(const Problem *, int64_t, int, int64_t, int) =
        level == ISA_AVX512 ? tile_avx512 : level == ISA_AVX2 ? tile_avx2 : tile_scalar;
    /* rows of W per tile: 4 for one row of x, else 2 (a 4 x 2 tile's 16 accumulators fit) */
    const int nr = level == ISA_AVX512 ? (M == 1 ? 4 : 2) : level == ISA_AVX2 ? 2 : 1;
    const int64_t tiles = (N + nr - 1) / nr;
    if ((double)M * N * K < 1 << 17) /* too small to pay for waking a second thread */
        threads = 1;
    /* Each thread takes a contiguous run of N tiles and walks it once per strip of 4 rows of x,
       so the strip stays in L1 while the thread's slice of W streams from L2. One thread runs
       without an OpenMP region: even a region of one costs 0.4-0.9 us, and the fused decode
       step calls this ~200 times a token per thread. */
    if (threads <= 1) {
        tile_run(tile, &p, nr, tiles, 0, 1);
    } else {
        #pragma omp parallel num_threads(threads)
        tile_run(tile, &p, nr, tiles, omp_get_thread_num(), omp_get_num_threads());
    }
    free(xp);
    return 0;
}

/* ------------------------------------------------------------------ quantization */
/* Codes as functional.quantize_4bit_codebook chooses them: per block absmax = max |w|, then the
   code of v = w * (1 / absmax) (bitsandbytes' arithmetic: a reciprocal, then a product) is
   order[#(mids < v)] (torch.bucketize over the 15 mid-points of
   the sorted codebook; `order` maps sorted positions to codes). Writes packed (N, K/2) and
   absmax (N, K/blocksize). */
__attribute__((always_inline)) static inline void quantize_row(const float *w, int64_t K, int bs, const float *mids, const uint8_t *order,
                                uint8_t *packed, float *absmax) {
    for (int64_t g = 0; g < K / bs; g++) {
        const float *b = w + g * bs;
        float amax = 0.0f;
        for (int j = 0; j < bs; j++) {
            float a = b[j] < 0 ? -b[j] : b[j];
            amax = a > amax ? a : amax;
        }
        absmax[g] = amax;
        const float r = 1.0f / (amax > 0 ? amax : 1.0f);
        uint8_t idx[256];
        for (int j = 0; j < bs; j++) {
            const float v = b[j] * r;
            int i = 0;
            for (int t = 0; t < 15; t++)
                i += mids[t] < v;
            idx[j] = (uint8_t)i;
        }
        for (int j = 0; j < bs / 2; j++)
            packed[g * bs / 2 + j] = (uint8_t)(order[idx[2 * j]] << 4 | order[idx[2 * j + 1]]);
    }
}

/* quantize_row with 16 lanes: #(mids < v) by a binary search over the sorted mid-points (four
   steps, each a permute and a compare; the predicate holds for a prefix of them, so the search
   lands on the count, NaN included: no mid-point compares below it), the code by a 16-entry
   permute, and two codes a byte by a 64-bit shift; the same products and comparisons as the
   scalar count, so the same codes. */
AVX512_FN void quantize_rows_avx512(const float *w, int64_t n0, int64_t n1, int64_t K, int bs, const float *mids,
                                    const uint8_t *order, uint8_t *packed, float *absmax) {
    int32_t order32[16] = {0};
    float mids16[16] = {0};
    for (int t = 0; t < 16; t++) {
        order32[t] = order[t < 15 ? t : 15];
        mids16[t] = mids[t < 15 ? t : 14]; /* lane 15 is never read: a search step reads lanes 0-14 */
    }
    const __m512i codes_of = _mm512_loadu_si512(order32), one = _mm512_set1_epi32(1);
    const __m512 midv = _mm512_loadu_ps(mids16);
    for (int64_t n = n0; n < n1; n++)
        for (int64_t g = 0; g < K / bs; g++) {
            const float *b = w + n * K + g * bs;
            __m512 amax = _mm512_setzero_ps();
            for (int j = 0; j < bs; j += 16)
                amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(b + j)));
            const float m = _mm512_reduce_max_ps(amax);
            absmax[n * (K / bs) + g] = m;
            const __m512 r = _mm512_set1_ps(1.0f / (m > 0 ? m : 1.0f));
            uint8_t *out = packed + n * (K / 2) + g * bs / 2;
            for (int j = 0; j < bs; j += 16) {
                const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(b + j), r);
                __m512i count = _mm512_setzero_si512();
                for (int step = 8; step; step >>= 1) {
                    const __m512i next = _mm512_add_epi32(count, _mm512_set1_epi32(step));
                    const __m512 mid = _mm512_permutexvar_ps(_mm512_sub_epi32(next, one), midv);
                    count = _mm512_mask_mov_epi32(count, _mm512_cmp_ps_mask(mid, v, _CMP_LT_OQ), next);
                }
                const __m512i code = _mm512_permutexvar_epi32(count, codes_of); /* < 16 */
                const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(code, 4), _mm512_srli_epi64(code, 32));
                _mm_storel_epi64((__m128i *)(out + j / 2), _mm512_cvtepi64_epi8(pair));
            }
        }
}

AVX2_FN void quantize_rows_avx2(const float *w, int64_t n0, int64_t n1, int64_t K, int bs, const float *mids,
                                const uint8_t *order, uint8_t *packed, float *absmax) {
    for (int64_t n = n0; n < n1; n++)
        quantize_row(w + n * K, K, bs, mids, order, packed + n * (K / 2), absmax + n * (K / bs));
}

static void quantize_rows_scalar(const float *w, int64_t n0, int64_t n1, int64_t K, int bs, const float *mids,
                                 const uint8_t *order, uint8_t *packed, float *absmax) {
    for (int64_t n = n0; n < n1; n++)
        quantize_row(w + n * K, K, bs, mids, order, packed + n * (K / 2), absmax + n * (K / bs));
}

static void quantize_strip(int level, const float *w, int64_t rows, int64_t K, int bs, const float *mids,
                           const uint8_t *order, uint8_t *packed, float *absmax) {
    if (level == ISA_AVX512)
        quantize_rows_avx512(w, 0, rows, K, bs, mids, order, packed, absmax);
    else if (level == ISA_AVX2)
        quantize_rows_avx2(w, 0, rows, K, bs, mids, order, packed, absmax);
    else
        quantize_rows_scalar(w, 0, rows, K, bs, mids, order, packed, absmax);
}

/* The NF4/FP4 codes and absmax of a weight held in dtype wt (float32, bfloat16 or float16, DT_*): 16-bit rows are
 * widened 16 at a time into a buffer per thread (exact), so a loader needs no float32 copy of the
 * matrix. Returns 0, or -1 if a buffer cannot be had or wt is unknown (nothing usable written). */
int mlm_nf4_quantize_from(const void *w, int wt, int64_t N, int64_t K, int blocksize, const float *mids,
                          const uint8_t *order, uint8_t *packed, float *absmax, int threads) {
    if (wt < DT_F32 || wt > DT_F16) return -1;
    const int level = isa_now();
    const int64_t strip = 16;
    int failed = 0;
    #pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *buf = wt ? malloc((size_t)(strip * K) * sizeof(float)) : NULL;
        if (wt && buf == NULL) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += strip) {
            const int64_t rows = n0 + strip < N ? strip : N - n0;
            const float *src = (const float *)w + n0 * K;
            if (wt) {
                if (buf == NULL) continue;
                widen_run(w, wt, n0 * K, rows * K, buf);
                src = buf;
            }
            quantize_strip(level, src, rows, K, blocksize, mids, order, packed + n0 * (K / 2),
                           absmax + n0 * (K / blocksize));
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
