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
#define T256 __attribute__((target("avx2,fma")))

static inline float bf16_to_f32(uint16_t h) { /* exact */
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round to nearest even; NaN -> 0x7FC0 */
    if (f != f) return 0x7FC0;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
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
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") ? 2 : 1;
    return cap < have ? (cap < 0 ? 0 : cap) : have;
}
#endif
