/* What the float kernels (attention.c, dense.c, step.c) share, so that each exists once: the
 * instruction-set attributes, bfloat16 conversions exactly as torch performs them, and the one
 * fixed summation order every dot product of these kernels uses (16 lanes, lane l taking
 * elements l, l + 16, ...; then the tree l + l+8, + l+4, + l+2, + l+1). The AVX-512 sum is that
 * tree on one register, the AVX2 one on two 8-lane halves holding lanes 0-7 and 8-15. */
#ifndef MLM_FLOAT_COMMON_H
#define MLM_FLOAT_COMMON_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define T256 __attribute__((target("avx2,fma,f16c"))) /* every AVX2 CPU has F16C */

static inline float bf16_to_f32(uint16_t h) { /* exact */
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round to nearest even; NaN -> 0x7FC0 */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0 : r; /* a select, not a branch: loops vectorize */
}

/* The dtype codes the kernels take (build.py's DTYPE_CODES): float32, bfloat16, float16. */
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline float f16_to_f32(uint16_t h) { /* exact, as torch widens float16 */
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F;
    uint32_t m = h & 0x3FF, u;
    if (e == 0x1F) u = sign | 0x7F800000u | (m << 13);
    else if (e) u = sign | ((e + 112) << 23) | (m << 13);
    else if (m == 0) u = sign;
    else { /* subnormal: normalize */
        uint32_t x = 113;
        while (!(m & 0x400)) {
            m <<= 1;
            x--;
        }
        u = sign | (x << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element i of an array in dtype dt (DT_*), widened to float32 exactly as torch widens it. */
static inline float widen_at(const void *p, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

/* Elements [at, at + n) of an array in dtype dt, widened into dst: the dtype is settled once, so
 * the bfloat16 loop (a shift) vectorizes where widen_at per element did not. */
static inline void widen_run(const void *p, int dt, int64_t at, int64_t n, float *dst) {
    if (dt == DT_F32) {
        memcpy(dst, (const float *)p + at, (size_t)n * sizeof(float));
    } else if (dt == DT_BF16) {
        const uint16_t *h = (const uint16_t *)p + at;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
    } else {
        const uint16_t *h = (const uint16_t *)p + at;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(h[i]);
    }
}

/* torch's float -> float16: round to nearest even, subnormals kept, overflow to infinity, NaN ->
 * 0x7E00 with its sign (c10::Half's rule), done with integers. */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00;
    if (a >= 0x477FF000u) return sign | 0x7C00; /* from 65520 on (and infinity): infinity */
    if (a >= 0x38800000u) {                      /* normal: rebias the exponent, round 13 bits off */
        const uint32_t r = a - 0x38000000u;
        return sign | (uint16_t)((r + 0x0FFFu + ((r >> 13) & 1u)) >> 13);
    }
    if (a <= 0x33000000u) return sign; /* at most 2^-25: rounds to zero */
    const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
    const int shift = 126 - (int)(a >> 23); /* 14..24 */
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

static inline float tree16(const float a[16]) {
    float s8[8], s4[4], s2[2];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    for (int l = 0; l < 2; l++) s2[l] = s4[l] + s4[l + 2];
    return s2[0] + s2[1];
}

T512 static inline __attribute__((always_inline)) float hsum512(__m512 a) {
    const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

T256 static inline __attribute__((always_inline)) float hsum256x2(__m256 lo, __m256 hi) {
    const __m256 s8 = _mm256_add_ps(lo, hi);
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
/* The widest instruction set these kernels may use here, at most `cap`: 2 AVX-512 (F, BW, VL),
 * 1 AVX2 with FMA, 0 scalar. */
static inline int capped_isa_level(int cap) {
    __builtin_cpu_init();
    int have = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") ? 2 : 1;
    return cap < have ? (cap < 0 ? 0 : cap) : have;
}
#endif
