/* One SIMD instantiation of the ggml kernels, included by ggml.c once per instruction set with
 * ISA (a name suffix), VNNI (0/1), MR and NR (the tile: activation rows x weight rows) defined,
 * inside a GCC target pragma: everything here is compiled for that instruction set only.
 *
 * Per (m, n) and per 32-block b the operations are exactly those of ggml.c's scalar path:
 * eight exact int32 lanes I (lane l covers elements 4l..4l+3), then
 *     acc = fma(cw * dx, (float)I, acc)   (Q6_K: cw per lane, d * sc)   and, for types with a min term,   accm = fma(mw, ds, accm)
 * on an 8-lane float accumulator, summed at the end by hsum8's fixed tree, plus the scalar accm. Tiles of any shape run
 * the same sequence per (m, n), so results do not depend on M, the N slice or the thread count. */


#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)

static inline __attribute__((always_inline)) float FN(f16)(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline __attribute__((always_inline)) float FN(hsum8)(__m256 v) {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

/* Weight 32-block b of one row: unsigned codes u (or signed for Q8_0 without VNNI), the float
 * coefficient cw, the min coefficient mw, or Q6_K's per-lane coefficients cwv. */
static inline __attribute__((always_inline)) void FN(decode)(const int type, const uint8_t *row, int64_t b,
                                                            __m256i *u, float *cw, float *mw, __m256 *cwv) {
    const __m256i m4 = _mm256_set1_epi8(15);
    if (type == T_Q4_0 || type == T_Q4_1) {
        const uint8_t *blk = row + b * (type == T_Q4_0 ? 18 : 20);
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + (type == T_Q4_0 ? 2 : 4)));
        *u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
        *cw = FN(f16)(blk);
        *mw = type == T_Q4_1 ? FN(f16)(blk + 2) : 0.0f;
    } else if (type == T_Q8_0) {
        const uint8_t *blk = row + b * 34;
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
        *u = VNNI ? _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)) : q;
        *cw = FN(f16)(blk);
        *mw = 0.0f;
    } else if (type == T_Q4_K) {
        const uint8_t *blk = row + (b >> 3) * 144;
        const int j = (int)(b & 7);
        __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (j >> 1)));
        *u = (j & 1) ? _mm256_and_si256(_mm256_srli_epi16(q, 4), m4) : _mm256_and_si256(q, m4);
        /* cw, mw: from the per-superblock table filled by kscales */
    } else { /* T_Q6_K */
        const uint8_t *blk = row + (b >> 3) * 210;
        const int j = (int)(b & 7), h = j >> 2, t = j & 3;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (t & 1)));
        __m256i lo = (t & 2) ? _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4) : _mm256_and_si256(ql, m4);
        __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        __m256i hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t)), _mm256_set1_epi8(3));
        *u = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
        /* per-lane d * sc (exact: an 11-bit mantissa times an int8) */
        const __m256i sc = _mm256_set_m128i(_mm_set1_epi32((int8_t)blk[193 + 2 * j]), _mm_set1_epi32((int8_t)blk[192 + 2 * j]));
        *cwv = _mm256_mul_ps(_mm256_set1_ps(FN(f16)(blk + 208)), _mm256_cvtepi32_ps(sc));
    }
}

/* Q4_K: d sc_j and -(dmin m_j) of the 8 sub-blocks of one superblock. */
static inline __attribute__((always_inline)) void FN(kscales)(const uint8_t *blk, float cw[8], float mw[8]) {
    const float d = FN(f16)(blk), dmin = FN(f16)(blk + 2);
    for (int j = 0; j < 8; j++) {
        int sc, mn;
        q4k_scale_min(blk + 4, j, &sc, &mn);
        cw[j] = d * (float)sc;
        mw[j] = -(dmin * (float)mn);
    }
}

/* The exact int32 lanes sum_{e in lane} u_e x_e - off * S (Q8_0 without VNNI: sum q_e x_e). */
static inline __attribute__((always_inline)) __m256i FN(dot)(const int type, __m256i corr, __m256i u, __m256i xq) {
#if VNNI
    (void)type;
    return _mm256_dpbusd_epi32(corr, u, xq);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (type == T_Q8_0)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(xq, u)), ones);
    return _mm256_add_epi32(corr, _mm256_madd_epi16(_mm256_maddubs_epi16(u, xq), ones));
#endif
}

/* The min terms of a tile, accm[i * NR + r] = fma(mw_r, ds_i, accm[i * NR + r]): one vector fma
 * per block for the whole tile instead of one per (i, r) and lane. */
#if MR * NR == 16
typedef __m512 FN(mvec);
static inline __attribute__((always_inline)) __m512 FN(minfma)(__m128 mw4, __m128 ds4, __m512 accm) {
    const __m512 a = _mm512_broadcast_f32x4(mw4);
    const __m512 b = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                           _mm512_castps128_ps512(ds4));
    return _mm512_fmadd_ps(a, b, accm);
}
#define MVEC_ZERO() _mm512_setzero_ps()
/* two 256-bit stores: Zen 4 does not forward a 512-bit store to the scalar loads that follow */
#define MVEC_STORE(p, v) (_mm256_store_ps(p, _mm512_castps512_ps256(v)), _mm256_store_ps((p) + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))))
#else
typedef __m256 FN(mvec);
static inline __attribute__((always_inline)) __m256 FN(minfma)(__m128 mw4, __m128 ds4, __m256 accm) {
    const __m256 a = _mm256_set_m128(mw4, mw4);
    const __m256 b = _mm256_set_m128(_mm_shuffle_ps(ds4, ds4, 0x55), _mm_shuffle_ps(ds4, ds4, 0));
    return _mm256_fmadd_ps(a, b, accm);
}
#define MVEC_ZERO() _mm256_setzero_ps()
#define MVEC_STORE(p, v) _mm256_store_ps(p, v)
#endif

/* out[i, r] for i < mr activation rows and r < nr weight rows, over all nb blocks. */
static inline __attribute__((always_inline)) void FN(tile)(const int type, const int mr, const int nr,
                                                          const xblock *x, int64_t nb, const uint8_t *w,
                                                          int64_t ldw, float *out, int64_t ldo) {
    const int shift = type == T_Q4_0 ? 3 : type == T_Q6_K ? 5 : type == T_Q8_0 ? 7 : 0;
    const int has_min = type == T_Q4_1 || type == T_Q4_K;
    const int64_t pf = 4 * type_bytes(type) * (type == T_Q4_K || type == T_Q6_K ? 1 : 8);
    __m256 acc[MR][NR];
    FN(mvec) accm = MVEC_ZERO();
    float kcw[8][4], kmw[8][4];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i u[NR];
        __m256 cwv[NR];
        float cw[NR], mw[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (type == T_Q4_K && (b & 7) == 0) {
#pragma GCC unroll 8
            for (int r = 0; r < nr; r++) {
                float c8[8], m8[8];
                FN(kscales)(w + r * ldw + (b >> 3) * 144, c8, m8);
                for (int j = 0; j < 8; j++) kcw[j][r] = c8[j], kmw[j][r] = m8[j];
            }
        }
        if ((b & 3) == 0) {
            const int64_t off = (type == T_Q4_K || type == T_Q6_K ? (b >> 3) : b) * type_bytes(type) + pf;
#pragma GCC unroll 8
            for (int r = 0; r < nr; r++) _mm_prefetch((const char *)(w + r * ldw + off), _MM_HINT_T0);
        }
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) {
            FN(decode)(type, w + r * ldw, b, &u[r], &cw[r], &mw[r], &cwv[r]);
            if (type == T_Q4_K) cw[r] = kcw[b & 7][r];
        }
        if (has_min) {
            const __m128 ds4 = mr == 1 ? _mm_set_ss(x[b].ds) : mr == 2 ? _mm_set_ps(0.0f, 0.0f, x[nb + b].ds, x[b].ds)
                             : mr == 3 ? _mm_set_ps(0.0f, x[2 * nb + b].ds, x[nb + b].ds, x[b].ds)
                                       : _mm_set_ps(x[3 * nb + b].ds, x[2 * nb + b].ds, x[nb + b].ds, x[b].ds);
            /* built in registers: a 16-byte load of four scalar stores would not be forwarded */
            const int j = (int)(b & 7);
            const __m128 mw4 = type == T_Q4_K ? (nr == 1 ? _mm_set_ss(kmw[j][0]) : _mm_set_ps(kmw[j][3], kmw[j][2], kmw[j][1], kmw[j][0]))
                                              : (nr == 1 ? _mm_set_ss(mw[0]) : _mm_set_ps(mw[3], mw[2], mw[1], mw[0]));
            accm = FN(minfma)(mw4, ds4, accm);
        }
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const xblock *xb = x + i * nb + b;
            const __m256i xq = _mm256_loadu_si256((const __m256i *)xb->q);
            const __m256i corr = shift ? _mm256_sub_epi32(_mm256_setzero_si256(),
                                                          _mm256_sll_epi32(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)xb->s)),
                                                                           _mm_cvtsi32_si128(shift)))
                                       : _mm256_setzero_si256();
            const __m256 dx = _mm256_set1_ps(xb->d);
#pragma GCC unroll 8
            for (int r = 0; r < nr; r++) {
                const __m256i I = FN(dot)(type, corr, u[r], xq);
                const __m256 c = _mm256_mul_ps(type == T_Q6_K ? cwv[r] : _mm256_set1_ps(cw[r]), dx);
                acc[i][r] = _mm256_fmadd_ps(c, _mm256_cvtepi32_ps(I), acc[i][r]);
            }
        }
    }
    float mins[MR * NR] __attribute__((aligned(64)));
    if (has_min) MVEC_STORE(mins, accm);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 8
        for (int r = 0; r < nr; r++) out[i * ldo + r] = has_min ? FN(hsum8)(acc[i][r]) + mins[i * NR + r] : FN(hsum8)(acc[i][r]);
}

#define TILE_NR(T, MRV)                                                                              \
    do {                                                                                             \
        if (nr == NR) FN(tile)(T, MRV, NR, x, nb, w, ldw, out, ldo);                                  \
        else for (int r_ = 0; r_ < nr; r_++) FN(tile)(T, MRV, 1, x, nb, w + r_ * ldw, ldw, out + r_, ldo); \
    } while (0)

#define TILE_TYPE(T)                                                                                 \
    case T:                                                                                          \
        switch (mr) {                                                                                \
        case 1: TILE_NR(T, 1); break;                                                                \
        case 2: TILE_NR(T, 2); break;                                                                \
        case 3: if (MR >= 3) TILE_NR(T, (MR >= 3 ? 3 : 1)); break;                                   \
        default: if (MR >= 4) TILE_NR(T, (MR >= 4 ? 4 : 1)); break;                                  \
        }                                                                                            \
        break;

static __attribute__((noinline)) void FN(run_tile)(int type, int mr, int nr, const xblock *x, int64_t nb,
                                                   const uint8_t *w, int64_t ldw, float *out, int64_t ldo) {
    switch (type) {
        TILE_TYPE(T_Q4_0)
        TILE_TYPE(T_Q4_1)
        TILE_TYPE(T_Q8_0)
        TILE_TYPE(T_Q4_K)
        TILE_TYPE(T_Q6_K)
    }
}

#undef TILE_TYPE
#undef TILE_NR

static void FN(matmul)(int type, const xblock *x, int64_t M, int64_t nb, const uint8_t *w, int64_t N,
                       int64_t ldw, float *out, int64_t ldo, int nthreads) {
    const int64_t ntiles = (N + NR - 1) / NR;
    const int64_t mc = M_CHUNK;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t t0 = ntiles * t / nt, t1 = ntiles * (t + 1) / nt;
        for (int64_t m0 = 0; m0 < M; m0 += mc) {
            const int64_t m1 = m0 + mc < M ? m0 + mc : M;
            for (int64_t tile = t0; tile < t1; tile++) {
                const int64_t n = tile * NR;
                const int nr = (int)(N - n < NR ? N - n : NR);
                for (int64_t i = m0; i < m1; i += MR) {
                    const int mr = (int)(m1 - i < MR ? m1 - i : MR);
                    FN(run_tile)(type, mr, nr, x + i * nb, nb, w + n * ldw, ldw, out + i * ldo + n, ldo);
                }
            }
        }
    }
}
#undef MVEC_ZERO
#undef MVEC_STORE

static __attribute__((unused)) void FN(quantize)(const float *x, int64_t M, int64_t K, int64_t ldx, xblock *out, int nthreads) {
    const int64_t nb = K / 32;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && M * K >= 65536) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *src = x + m * ldx + 32 * b;
            xblock *dst = out + m * nb + b;
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int k = 0; k < 4; k++) {
                v[k] = _mm256_loadu_ps(src + 8 * k);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
            }
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            a4 = _mm_max_ss(a4, _mm_shuffle_ps(a4, a4, 1));
            const float d = _mm_cvtss_f32(a4) / 127.0f;
            memset(dst, 0, sizeof *dst);
            dst->d = d;
            if (d == 0.0f) continue;
            const __m256 vd = _mm256_set1_ps(d);
            __m256i q[4];
            for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_div_ps(v[k], vd));
            /* int32 -> int8 codes in order, and the sums of each 4 consecutive codes */
            __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
            __m256i p = _mm256_packs_epi16(p01, p23);
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)dst->q, p);
            __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p), _mm256_set1_epi16(1));
            _mm_storeu_si128((__m128i *)dst->s, _mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1)));
            int total = 0;
            for (int l = 0; l < 8; l++) total += dst->s[l];
            dst->ds = d * (float)total;
        }
    }
}

#undef FN
#undef CAT
#undef CAT_
