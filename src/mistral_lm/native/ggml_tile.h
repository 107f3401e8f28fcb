/* One SIMD instantiation of the ggml kernels, included by ggml.c once per instruction set with
 * ISA (a name suffix), VNNI (0/1: AVX-512 with 512-bit vectors, else AVX2), MR (activation rows
 * per register tile) and NRP (weight rows per panel = int32 lanes per vector) defined, inside a
 * GCC target pragma: everything here is compiled for that instruction set only.
 *
 * Weights are first unpacked, NRP rows x KC blocks at a time, into a per-thread panel laid out for
 * the dot-product instructions: for each 32-block, eight vectors of codes (vector g holds elements
 * 4g..4g+3 of every row, lane r = row r) followed by the rows' float cw, float mw and, for Q6_K,
 * the int32 scales of the two 16-element halves. One activation block's 4 codes are broadcast
 * into every lane, so eight vpdpbusd (AVX2: vpmaddubsw + vpmaddwd) leave each lane with its row's
 * exact block dot product I, and then per (m, n) and block
 *     acc = fma(fl(cw * dx), (float)I, acc)      and, with a min term,   accm = fma(mw, ds, accm)
 * with out = acc (+ accm): exactly ggml.c's scalar sequence, whatever the tile, M, the N slice or
 * the thread count. The panel is reused by every activation row of an M chunk. */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)
#define AI inline __attribute__((always_inline))

#if VNNI
typedef __m512i FN(vi);
typedef __m512 FN(vf);
#define V_LOADI(p) _mm512_load_si512((const void *)(p))
#define V_STOREI(p, v) _mm512_store_si512((void *)(p), v)
#define V_LOADF(p) _mm512_load_ps(p)
#define V_STOREF(p, v) _mm512_store_ps(p, v)
#define V_SET1I(v) _mm512_set1_epi32(v)
#define V_SET1B(v) _mm512_set1_epi8(v)
#define V_SET1F(v) _mm512_set1_ps(v)
#define V_ZEROI() _mm512_setzero_si512()
#define V_ZEROF() _mm512_setzero_ps()
#define V_AND(a, b) _mm512_and_si512(a, b)
#define V_OR(a, b) _mm512_or_si512(a, b)
#define V_XOR(a, b) _mm512_xor_si512(a, b)
#define V_SRLI16(a, n) _mm512_srli_epi16(a, n)
#define V_SRL16(a, n) _mm512_srl_epi16(a, _mm_cvtsi32_si128(n))
#define V_SLLI16(a, n) _mm512_slli_epi16(a, n)
#define V_SRLI32(a, n) _mm512_srli_epi32(a, n)
#define V_SLLI32(a, n) _mm512_slli_epi32(a, n)
#define V_SRAI32(a, n) _mm512_srai_epi32(a, n)
#define V_ADDI(a, b) _mm512_add_epi32(a, b)
#define V_MULLO(a, b) _mm512_mullo_epi32(a, b)
#define V_UNLO32(a, b) _mm512_unpacklo_epi32(a, b)
#define V_UNHI32(a, b) _mm512_unpackhi_epi32(a, b)
#define V_UNLO64(a, b) _mm512_unpacklo_epi64(a, b)
#define V_UNHI64(a, b) _mm512_unpackhi_epi64(a, b)
#define V_CVT(a) _mm512_cvtepi32_ps(a)
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_NEG(a) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32((int)0x80000000u)))
#define V_GATHER(base, idx) _mm512_i32gather_epi32(idx, (const void *)(base), 1)
#define V_H16LO(v) _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v))
#else
typedef __m256i FN(vi);
typedef __m256 FN(vf);
#define V_LOADI(p) _mm256_load_si256((const __m256i *)(p))
#define V_STOREI(p, v) _mm256_store_si256((__m256i *)(p), v)
#define V_LOADF(p) _mm256_load_ps(p)
#define V_STOREF(p, v) _mm256_store_ps(p, v)
#define V_SET1I(v) _mm256_set1_epi32(v)
#define V_SET1B(v) _mm256_set1_epi8(v)
#define V_SET1F(v) _mm256_set1_ps(v)
#define V_ZEROI() _mm256_setzero_si256()
#define V_ZEROF() _mm256_setzero_ps()
#define V_AND(a, b) _mm256_and_si256(a, b)
#define V_OR(a, b) _mm256_or_si256(a, b)
#define V_XOR(a, b) _mm256_xor_si256(a, b)
#define V_SRLI16(a, n) _mm256_srli_epi16(a, n)
#define V_SRL16(a, n) _mm256_srl_epi16(a, _mm_cvtsi32_si128(n))
#define V_SLLI16(a, n) _mm256_slli_epi16(a, n)
#define V_SRLI32(a, n) _mm256_srli_epi32(a, n)
#define V_SLLI32(a, n) _mm256_slli_epi32(a, n)
#define V_SRAI32(a, n) _mm256_srai_epi32(a, n)
#define V_ADDI(a, b) _mm256_add_epi32(a, b)
#define V_MULLO(a, b) _mm256_mullo_epi32(a, b)
#define V_UNLO32(a, b) _mm256_unpacklo_epi32(a, b)
#define V_UNHI32(a, b) _mm256_unpackhi_epi32(a, b)
#define V_UNLO64(a, b) _mm256_unpacklo_epi64(a, b)
#define V_UNHI64(a, b) _mm256_unpackhi_epi64(a, b)
#define V_CVT(a) _mm256_cvtepi32_ps(a)
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_NEG(a) _mm256_xor_ps(a, _mm256_set1_ps(-0.0f))
#define V_GATHER(base, idx) _mm256_i32gather_epi32((const int *)(base), idx, 1)
static AI __m256 FN(h16lo)(__m256i v) {
    const __m256i t = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1)));
}
#define V_H16LO(v) FN(h16lo)(v)
#endif
#define V_H16HI(v) V_H16LO(V_SRLI32(v, 16))

#define vi_t FN(vi)
#define vf_t FN(vf)

#define VB ((int)sizeof(vi_t))  /* bytes of one vector = 4 * NRP */
#define PB (12 * VB)            /* panel bytes per block: 8 code vectors, cw, mw, two Q6_K scales */
#ifndef DIRECT_M
#define DIRECT_M 2
#endif
#define KC 16                   /* blocks per panel (a multiple of 8: whole Q4_K / Q6_K superblocks) */

/* 16 bytes at offset off of rows a, a + 4, ... (128-bit lane l = row 4l + a) */
static AI vi_t FN(load4)(const uint8_t *const *rp, int a, int64_t off) {
#if VNNI
    __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rp[a] + off)));
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[4 + a] + off)), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[8 + a] + off)), 2);
    return _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rp[12 + a] + off)), 3);
#else
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rp[a] + off))),
                                   _mm_loadu_si128((const __m128i *)(rp[4 + a] + off)), 1);
#endif
}

/* A 4x4 dword transpose in each 128-bit lane: z[a] with dword k of lane l from row 4l + a  ->
 * out[k] with lane 4l + a = that dword (one row per 32-bit lane). */
static AI void FN(t4)(const vi_t z[4], vi_t out[4]) {
    const vi_t t0 = V_UNLO32(z[0], z[1]), t1 = V_UNHI32(z[0], z[1]), t2 = V_UNLO32(z[2], z[3]), t3 = V_UNHI32(z[2], z[3]);
    out[0] = V_UNLO64(t0, t2);
    out[1] = V_UNHI64(t0, t2);
    out[2] = V_UNLO64(t1, t3);
    out[3] = V_UNHI64(t1, t3);
}

/* z[a] with dword k of lane l = codes 4k..4k+3 of row 4l + a  ->  dst[k] lane 4l + a. */
static AI void FN(store_t4)(const vi_t z[4], uint8_t *dst) {
    vi_t out[4];
    FN(t4)(z, out);
    for (int k = 0; k < 4; k++) V_STOREI(dst + k * VB, out[k]);
}

/* The 4 bytes at offset off of each of the NRP rows, lane r = row r (idx: the rows' offsets from
 * rp[0]): by scalar loads or by a gather, as scalar_row_loads (ggml.c) says. */
static AI vi_t FN(rows4)(const uint8_t *const *rp, vi_t idx, int64_t off) {
    if (!scalar_row_loads) return V_GATHER(rp[0] + off, idx);
    int32_t v[NRP];
    for (int r = 0; r < NRP; r++) memcpy(&v[r], rp[r] + off, 4);
#if VNNI
    return _mm512_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13],
                             v[14], v[15]);
#else
    return _mm256_setr_epi32(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]);
#endif
}

/* Block b of the NRP rows rp[] (offsets idx from rp[0]) in registers: lo[a] / hi[a] hold codes
 * 0..15 / 16..31 of rows 4l + a in 128-bit lane l; cw, mw and Q6_K's half scales sc0, sc1 per
 * row (lane). Q4_K: kcw / kmw cache the superblock's 8 scales, filled at its first block, and
 * zc the bytes of an even sub-block, whose high nibbles are the next (odd) one's codes: blocks
 * come in order from a superblock's start, so the odd one reads them from there. */
static AI void FN(wblock)(const int type, const uint8_t *const *rp, vi_t idx, int64_t b, const int j, vi_t lo[4], vi_t hi[4],
                          vf_t *cw, vf_t *mw, vi_t *sc0, vi_t *sc1, vf_t kcw[8], vf_t kmw[8], vi_t zc[8]) {
    const vi_t m4 = V_SET1B(15);
    *mw = V_ZEROF();
    *sc0 = *sc1 = V_ZEROI();
    if (type == T_Q4_0 || type == T_Q4_1) {
        const int64_t o = b * (type == T_Q4_0 ? 18 : 20);
        for (int a = 0; a < 4; a++) {
            const vi_t z = FN(load4)(rp, a, o + (type == T_Q4_0 ? 2 : 4));
            lo[a] = V_AND(z, m4);
            hi[a] = V_AND(V_SRLI16(z, 4), m4);
        }
        const vi_t g = FN(rows4)(rp, idx, o);
        *cw = V_H16LO(g);
        if (type == T_Q4_1) *mw = V_H16HI(g);
    } else if (type == T_Q8_0) {
        const int64_t o = b * 34;
        const vi_t flip = VNNI ? V_SET1B((char)0x80) : V_ZEROI();
        for (int a = 0; a < 4; a++) {
            lo[a] = V_XOR(FN(load4)(rp, a, o + 2), flip);
            hi[a] = V_XOR(FN(load4)(rp, a, o + 18), flip);
        }
        *cw = V_H16LO(FN(rows4)(rp, idx, o));
    } else if (type == T_Q4_K) {
        const int64_t sb = (b >> 3) * 144;
        for (int a = 0; a < 4; a++) {
            if (!(j & 1)) {
#if VNNI
                /* both 16-byte halves of each row at once: 32 bytes from each of 4 rows, then two
                 * lane shuffles put half 0 of rows a, a+4, a+8, a+12 in zc[2a] and half 1 in zc[2a+1],
                 * as two load4 calls would */
                const int64_t off = sb + 16 + 32 * (j >> 1);
                const __m512i r01 = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[a] + off))),
                    _mm256_loadu_si256((const __m256i *)(rp[4 + a] + off)), 1);
                const __m512i r23 = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rp[8 + a] + off))),
                    _mm256_loadu_si256((const __m256i *)(rp[12 + a] + off)), 1);
                zc[2 * a] = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(2, 0, 2, 0));
                zc[2 * a + 1] = _mm512_shuffle_i64x2(r01, r23, _MM_SHUFFLE(3, 1, 3, 1));
#else
                zc[2 * a] = FN(load4)(rp, a, sb + 16 + 32 * (j >> 1));
                zc[2 * a + 1] = FN(load4)(rp, a, sb + 32 + 32 * (j >> 1));
#endif
            }
            const vi_t z0 = zc[2 * a], z1 = zc[2 * a + 1];
            lo[a] = (j & 1) ? V_AND(V_SRLI16(z0, 4), m4) : V_AND(z0, m4);
            hi[a] = (j & 1) ? V_AND(V_SRLI16(z1, 4), m4) : V_AND(z1, m4);
        }
        if (j == 0) { /* the superblock's 8 scales and mins */
            vi_t hd[4]; /* dwords 0..3 of each row's header: d | dmin, then the 12 scale bytes */
            if (scalar_row_loads) {
                /* each row's 16 header bytes by one 16-byte load, then a 4x4 dword transpose: 16
                 * loads where four rows4 calls take 64 and their inserts */
                vi_t z[4];
                for (int a = 0; a < 4; a++) z[a] = FN(load4)(rp, a, sb);
                FN(t4)(z, hd);
            } else {
                for (int k = 0; k < 4; k++) hd[k] = FN(rows4)(rp, idx, sb + 4 * k);
            }
            const vi_t dd = hd[0], s0 = hd[1], s1 = hd[2], s2 = hd[3];
            /* -(dmin * mn) == (-dmin) * mn exactly: a product's rounding does not depend on signs */
            const vf_t d = V_H16LO(dd), ndmin = V_NEG(V_H16HI(dd));
            /* the four 6-bit scales (mins) of sub-blocks 0-3 and of 4-7, one per byte of a dword:
             * low four bits from s0 / s1 (0-3) or s2's nibbles (4-7), 4-7's top two from s0 / s1 */
            const vi_t m6 = V_SET1I(0x3f3f3f3f), m4b = V_SET1I(0x0f0f0f0f), m2b = V_SET1I(0x30303030);
            const vi_t scb[2] = {V_AND(s0, m6), V_OR(V_AND(s2, m4b), V_AND(V_SRLI32(s0, 2), m2b))};
            const vi_t mnb[2] = {V_AND(s1, m6), V_OR(V_AND(V_SRLI32(s2, 4), m4b), V_AND(V_SRLI32(s1, 2), m2b))};
#define KBYTE(v, k) ((k) == 3 ? V_SRLI32(v, 24) : V_AND((k) ? V_SRLI32(v, 8 * (k)) : (v), V_SET1I(255)))
#pragma GCC unroll 8
            for (int jj = 0; jj < 8; jj++) {
                kcw[jj] = V_MUL(d, V_CVT(KBYTE(scb[jj >> 2], jj & 3)));
                kmw[jj] = V_MUL(ndmin, V_CVT(KBYTE(mnb[jj >> 2], jj & 3)));
            }
#undef KBYTE
        }
        *cw = kcw[j];
        *mw = kmw[j];
    } else { /* T_Q6_K */
        const int64_t sb = (b >> 3) * 210;
        const int h = j >> 2, t = j & 3;
        const vi_t m3 = V_SET1B(3);
        for (int a = 0; a < 4; a++) {
            for (int e = 0; e < 2; e++) {
                const vi_t ql = FN(load4)(rp, a, sb + 64 * h + 32 * (t & 1) + 16 * e);
                const vi_t qh = FN(load4)(rp, a, sb + 128 + 32 * h + 16 * e);
                const vi_t l4 = (t & 2) ? V_AND(V_SRLI16(ql, 4), m4) : V_AND(ql, m4);
                const vi_t u = V_OR(l4, V_SLLI16(V_AND(V_SRL16(qh, 2 * t), m3), 4));
                if (e) hi[a] = u;
                else lo[a] = u;
            }
        }
        *cw = V_H16HI(FN(rows4)(rp, idx, sb + 206));
        const vi_t sc = FN(rows4)(rp, idx, sb + 192 + 2 * j);
        *sc0 = V_SRAI32(V_SLLI32(sc, 24), 24);
        *sc1 = V_SRAI32(V_SLLI32(sc, 16), 24);
    }
}

/* Block b0 + k (sub-block j of its superblock) into the panel. */
static AI void FN(ublock)(const int type, const uint8_t *const *rp, vi_t idx, int64_t b0, int k, const int j,
                          uint8_t *panel, vf_t kcw[8], vf_t kmw[8], vi_t zc[8]) {
    uint8_t *pb = panel + (size_t)k * PB;
    vi_t lo[4], hi[4], sc0, sc1;
    vf_t cw, mw;
    FN(wblock)(type, rp, idx, b0 + k, j, lo, hi, &cw, &mw, &sc0, &sc1, kcw, kmw, zc);
    V_STOREF((float *)(pb + 8 * VB), cw);
    V_STOREF((float *)(pb + 9 * VB), mw);
    V_STOREI(pb + 10 * VB, sc0);
    V_STOREI(pb + 11 * VB, sc1);
    FN(store_t4)(lo, pb);
    FN(store_t4)(hi, pb + 4 * VB);
}

/* Blocks b0 .. b0 + kc - 1 (b0 at a superblock start, kc a multiple of 8 for superblock types)
 * into the panel; a superblock per pass, unrolled, as in direct. */
static AI void FN(unpack_t)(const int type, const uint8_t *const *rp, vi_t idx, int64_t b0, int kc, uint8_t *panel) {
    vf_t kcw[8], kmw[8];
    vi_t zc[8];
    for (int i = 0; i < 8; i++) zc[i] = V_ZEROI(); /* filled by each even Q4_K block before its odd one reads it */
    if (type == T_Q4_K || type == T_Q6_K) {
        for (int k0 = 0; k0 < kc; k0 += 8) {
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) FN(ublock)(type, rp, idx, b0, k0 + j, j, panel, kcw, kmw, zc);
        }
    } else {
        for (int k = 0; k < kc; k++) FN(ublock)(type, rp, idx, b0, k, 0, panel, kcw, kmw, zc);
    }
}

/* unpack with the type a constant in each case */
static __attribute__((noinline)) void FN(unpack)(int type, const uint8_t *const *rp, vi_t idx, int64_t b0, int kc,
                                                 uint8_t *panel) {
    switch (type) {
    case T_Q4_0: FN(unpack_t)(T_Q4_0, rp, idx, b0, kc, panel); break;
    case T_Q4_1: FN(unpack_t)(T_Q4_1, rp, idx, b0, kc, panel); break;
    case T_Q8_0: FN(unpack_t)(T_Q8_0, rp, idx, b0, kc, panel); break;
    case T_Q4_K: FN(unpack_t)(T_Q4_K, rp, idx, b0, kc, panel); break;
    case T_Q6_K: FN(unpack_t)(T_Q6_K, rp, idx, b0, kc, panel); break;
    }
}

/* The first nr lanes of o to dst: one output row of a tile (lanes past the matrix's last row are
 * not stored). */
static AI void FN(store_row)(float *dst, vf_t o, int nr) {
#if VNNI
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << nr) - 1), o);
#else
    _mm256_maskstore_ps(dst, _mm256_cmpgt_epi32(_mm256_set1_epi32(nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), o);
#endif
}

/* Sum of the four dwords of each 128-bit lane of p[a] -> lane 4l + a (l: the 128-bit lane). */
static AI vi_t FN(reduce4)(const vi_t p[4]) {
    const vi_t s01 = V_ADDI(V_UNLO32(p[0], p[1]), V_UNHI32(p[0], p[1]));
    const vi_t s23 = V_ADDI(V_UNLO32(p[2], p[3]), V_UNHI32(p[2], p[3]));
    return V_ADDI(V_UNLO64(s01, s23), V_UNHI64(s01, s23));
}

#if VNNI
#define V_BCAST128(p) _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(p)))
#else
#define V_BCAST128(p) _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p)))
#endif

/* Lanes += the dot products of code vector W with 4 activation codes broadcast (AVX2: sums of
 * up to `pairs` vpmaddubsw results are exact in int16 before the vpmaddwd). */
#if !VNNI
static AI vi_t FN(mad16)(const int type, vi_t W, vi_t xw) {
    if (type == T_Q8_0) return _mm256_maddubs_epi16(_mm256_sign_epi8(W, W), _mm256_sign_epi8(xw, W));
    return _mm256_maddubs_epi16(W, xw);
}
#endif

/* Small M (decode): mr activation rows times one tile of NRP weight rows over all nb blocks,
 * straight from the blocks (no panel): each block's 16-byte row chunks stay one row per 128-bit
 * lane, the activation codes are broadcast per 128-bit lane and each lane's four partial sums are
 * added at the end. The same exact int32 I per (m, n, block), so the same result as the panel path. */
#ifndef PREFETCH_AHEAD
/* bytes ahead in each weight row that decode prefetches: the step is bound by memory latency with
 * 16 rows in flight, and a longer lead streams a 7B's rows markedly faster (bench/RESULTS.md) */
#define PREFETCH_AHEAD 4096
#endif
/* Block b of the direct path; j: its sub-block in the superblock (Q4_K, Q6_K), else b's parity,
 * which is all the prefetch below reads. */
static AI void FN(dblock)(const int type, const int mr, const xblock *x, int64_t nb, const uint8_t *const *rp,
                          vi_t idx, int64_t ldw, int64_t b, const int j, vf_t acc[MR], vf_t accm[MR], vf_t kcw[8],
                          vf_t kmw[8], vi_t zc[8]) {
    const int sh = off_shift(type) - (!VNNI && type == T_Q8_0 ? 8 : 0);
    const int has_min = type == T_Q4_1 || type == T_Q4_K, tb = type_bytes(type);
    const int sup = type == T_Q4_K || type == T_Q6_K;
    const int64_t rowb = sup ? (nb >> 3) * tb : nb * tb; /* bytes of one row of blocks */
    if ((j & 1) == 0) {
        /* PREFETCH_AHEAD bytes ahead in each row; past a row's end, into the same row of the next tile (rows
         * NRP further on), so a new tile's rows do not start on demand misses (a 4096-wide
         * Q4_0 row is only 2304 bytes) */
        const int64_t o = (sup ? (b >> 3) * tb + (b & 7) * (tb / 8) : b * tb) + PREFETCH_AHEAD;
        const int64_t ahead = o < rowb ? o : o - rowb + NRP * ldw;
#pragma GCC unroll 16
        for (int r = 0; r < NRP; r++) _mm_prefetch((const char *)(rp[r] + ahead), _MM_HINT_T1);
    }
    vi_t lo[4], hi[4], sc0, sc1;
    vf_t cw, mw;
    FN(wblock)(type, rp, idx, b, j, lo, hi, &cw, &mw, &sc0, &sc1, kcw, kmw, zc);
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        const xblock *xb = x + i * nb + b;
        const vi_t xl = V_BCAST128(xb->q), xh = V_BCAST128(xb->q + 16);
        vi_t p[4], p2[4];
#pragma GCC unroll 4
        for (int a = 0; a < 4; a++) {
#if VNNI
            if (type == T_Q6_K) {
                p[a] = _mm512_dpbusd_epi32(V_ZEROI(), lo[a], xl);
                p2[a] = _mm512_dpbusd_epi32(V_ZEROI(), hi[a], xh);
            } else {
                p[a] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(V_ZEROI(), lo[a], xl), hi[a], xh);
            }
#else
            const __m256i ones = _mm256_set1_epi16(1);
            if (type == T_Q6_K) {
                p[a] = _mm256_madd_epi16(FN(mad16)(type, lo[a], xl), ones);
                p2[a] = _mm256_madd_epi16(FN(mad16)(type, hi[a], xh), ones);
            } else if (type == T_Q8_0) {
                p[a] = _mm256_add_epi32(_mm256_madd_epi16(FN(mad16)(type, lo[a], xl), ones),
                                        _mm256_madd_epi16(FN(mad16)(type, hi[a], xh), ones));
            } else {
                p[a] = _mm256_madd_epi16(_mm256_add_epi16(FN(mad16)(type, lo[a], xl), FN(mad16)(type, hi[a], xh)), ones);
            }
#endif
        }
        vi_t I;
        if (type == T_Q6_K) {
            const vi_t Il = V_ADDI(FN(reduce4)(p), V_SET1I(-(xb->sxl << sh)));
            const vi_t Ih = V_ADDI(FN(reduce4)(p2), V_SET1I(-((xb->sx - xb->sxl) << sh)));
            I = V_ADDI(V_MULLO(Il, sc0), V_MULLO(Ih, sc1));
        } else {
            I = FN(reduce4)(p);
            if (sh >= 0) I = V_ADDI(I, V_SET1I(-(xb->sx << sh)));
        }
        acc[i] = V_FMA(V_MUL(cw, V_SET1F(xb->d)), V_CVT(I), acc[i]);
        if (has_min) accm[i] = V_FMA(mw, V_SET1F(xb->ds), accm[i]);
    }
}

static AI void FN(direct)(const int type, const int mr, const xblock *x, int64_t nb, const uint8_t *const *rp,
                          vi_t idx, int64_t ldw, float *out, int64_t ldo, int nr) {
    const int has_min = type == T_Q4_1 || type == T_Q4_K;
    vf_t acc[MR], accm[MR], kcw[8], kmw[8];
    vi_t zc[8];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) zc[i] = V_ZEROI(); /* as in unpack */
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) acc[i] = accm[i] = V_ZEROF();
    if (type == T_Q4_K || type == T_Q6_K) {
        /* a superblock per pass, unrolled: the sub-block index is a constant, so its scales, its
         * nibble half and the cached codes resolve at compile time */
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) FN(dblock)(type, mr, x, nb, rp, idx, ldw, b0 + j, j, acc, accm, kcw, kmw, zc);
        }
    } else {
        for (int64_t b = 0; b < nb; b++) FN(dblock)(type, mr, x, nb, rp, idx, ldw, b, (int)(b & 1), acc, accm, kcw, kmw, zc);
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        const vf_t o = has_min ? V_ADD(acc[i], accm[i]) : acc[i];
        FN(store_row)(out + i * ldo, o, nr);
    }
}

#define DIRECT_MR(T)                                                                                 \
    case T:                                                                                          \
        if (mr == 1) FN(direct)(T, 1, x, nb, rp, idx, ldw, out, ldo, nr);                             \
        else FN(direct)(T, 2, x, nb, rp, idx, ldw, out, ldo, nr);                                     \
        break;

static __attribute__((noinline)) void FN(run_direct)(int type, int mr, const xblock *x, int64_t nb,
                                                     const uint8_t *const *rp, vi_t idx, int64_t ldw, float *out,
                                                     int64_t ldo, int nr) {
    switch (type) {
        DIRECT_MR(T_Q4_0)
        DIRECT_MR(T_Q4_1)
        DIRECT_MR(T_Q8_0)
        DIRECT_MR(T_Q4_K)
        DIRECT_MR(T_Q6_K)
    }
}
#undef DIRECT_MR
#undef V_BCAST128

static AI vi_t FN(xword)(const xblock *xb, int g) {
    int32_t v;
    memcpy(&v, xb->q + 4 * g, 4);
    return V_SET1I(v);
}

#if !VNNI
/* s[i] += vpmaddubsw(the code vector at w: group g of a panel block, codes 4g..4g+3 of activation row i) for
 * the Q4 types, in asm: written as intrinsics, GCC hoisted every product of the block ahead of
 * the int16 sums and spilled them to the stack. One load of the code vector per group, reused by
 * every activation row. The same int16 sums. */
static AI void FN(q4group)(const int mr, __m256i s[MR], const uint8_t *w, const xblock *x0, int64_t nb, int g) {
    __m256i W, t0, t1, t2;
    const int32_t *a0 = (const int32_t *)(x0->q + 4 * g);
    if (mr == 1) {
        __asm__("vmovdqa %[w], %[W]\n\tvpbroadcastd %[a0], %[t0]\n\t"
                "vpmaddubsw %[t0], %[W], %[t0]\n\tvpaddw %[t0], %[s0], %[s0]"
                : [s0] "+x"(s[0]), [W] "=&x"(W), [t0] "=&x"(t0)
                : [w] "m"(*(const __m256i *)w), [a0] "m"(*a0));
    } else if (mr == 2) {
        const int32_t *a1 = (const int32_t *)(x0[nb].q + 4 * g);
        __asm__("vmovdqa %[w], %[W]\n\tvpbroadcastd %[a0], %[t0]\n\tvpbroadcastd %[a1], %[t1]\n\t"
                "vpmaddubsw %[t0], %[W], %[t0]\n\tvpmaddubsw %[t1], %[W], %[t1]\n\t"
                "vpaddw %[t0], %[s0], %[s0]\n\tvpaddw %[t1], %[s1], %[s1]"
                : [s0] "+x"(s[0]), [s1] "+x"(s[1]), [W] "=&x"(W), [t0] "=&x"(t0), [t1] "=&x"(t1)
                : [w] "m"(*(const __m256i *)w), [a0] "m"(*a0), [a1] "m"(*a1));
    } else {
        const int32_t *a1 = (const int32_t *)(x0[nb].q + 4 * g), *a2 = (const int32_t *)(x0[2 * nb].q + 4 * g);
        __asm__("vmovdqa %[w], %[W]\n\tvpbroadcastd %[a0], %[t0]\n\tvpbroadcastd %[a1], %[t1]\n\t"
                "vpbroadcastd %[a2], %[t2]\n\t"
                "vpmaddubsw %[t0], %[W], %[t0]\n\tvpmaddubsw %[t1], %[W], %[t1]\n\tvpmaddubsw %[t2], %[W], %[t2]\n\t"
                "vpaddw %[t0], %[s0], %[s0]\n\tvpaddw %[t1], %[s1], %[s1]\n\tvpaddw %[t2], %[s2], %[s2]"
                : [s0] "+x"(s[0]), [s1] "+x"(s[1]), [s2] "+x"(s[2]), [W] "=&x"(W), [t0] "=&x"(t0),
                  [t1] "=&x"(t1), [t2] "=&x"(t2)
                : [w] "m"(*(const __m256i *)w), [a0] "m"(*a0), [a1] "m"(*a1), [a2] "m"(*a2));
    }
}
#endif

#if VNNI
/* acc + the dot products of W's lanes with activation codes 4g..4g+3 of xb, the codes read by the
 * instruction's own broadcast ({1to16}): GCC emits a separate vpbroadcastd for the intrinsic, an
 * extra instruction per dot product in the prefill loop. The same integer result. */
static AI vi_t FN(dpbusd_x)(vi_t acc, vi_t W, const xblock *xb, int g) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(W), "m"(*(const int32_t *)(xb->q + 4 * g)));
    return acc;
}
#endif


/* mr activation rows (x: row stride nb blocks) times a panel of kc blocks; acc/accm continue
 * from abuf/mbuf unless first; the result goes to out (nr columns) if last, else back to the buffers. */
static AI void FN(kern)(const int type, const int mr, const xblock *x, int64_t nb, int kc, const uint8_t *panel,
                        float *abuf, float *mbuf, int first, int last, float *out, int64_t ldo, int nr) {
    const int sh = off_shift(type) - (!VNNI && type == T_Q8_0 ? 8 : 0); /* AVX2 Q8_0: signed codes */
    const int has_min = type == T_Q4_1 || type == T_Q4_K, split = has_min && !VNNI;
    vf_t acc[MR], accm[MR];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        acc[i] = first ? V_ZEROF() : V_LOADF(abuf + i * NRP);
        accm[i] = first || !has_min ? V_ZEROF() : V_LOADF(mbuf + i * NRP);
    }
    for (int k = 0; k < kc; k++) {
        const uint8_t *pb = panel + (size_t)k * PB;
        vi_t I[MR], I2[MR];
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const xblock *xb = x + i * nb + k;
            if (type == T_Q6_K) {
                I[i] = V_SET1I(-(xb->sxl << sh));
                I2[i] = V_SET1I(-((xb->sx - xb->sxl) << sh));
            } else {
                I[i] = sh >= 0 ? V_SET1I(-(xb->sx << sh)) : V_ZEROI();
                I2[i] = V_ZEROI();
            }
        }
#if VNNI
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            const vi_t W = V_LOADI(pb + g * VB);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                if (type == T_Q6_K && g >= 4) I2[i] = FN(dpbusd_x)(I2[i], W, x + i * nb + k, g);
                else I[i] = FN(dpbusd_x)(I[i], W, x + i * nb + k, g);
            }
        }
#else
        /* int16 sums that cannot overflow: Q4 codes <= 15 (8 groups), Q6_K <= 63 (2), Q8_0 (1) */
        const int pairs = type == T_Q8_0 ? 1 : type == T_Q6_K ? 2 : 8;
        const __m256i ones = _mm256_set1_epi16(1);
        if (pairs == 8 && MR <= 3) { /* q4group holds up to 3 rows */
            __m256i s[MR];
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) s[i] = V_ZEROI();
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) FN(q4group)(mr, s, pb + g * VB, x + k, nb, g);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) I[i] = V_ADDI(I[i], _mm256_madd_epi16(s[i], ones));
        } else
#pragma GCC unroll 8
        for (int g0 = 0; g0 < 8; g0 += pairs) {
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                __m256i s = FN(mad16)(type, V_LOADI(pb + g0 * VB), FN(xword)(x + i * nb + k, g0));
#pragma GCC unroll 8
                for (int g = g0 + 1; g < g0 + pairs; g++)
                    s = _mm256_add_epi16(s, FN(mad16)(type, V_LOADI(pb + g * VB), FN(xword)(x + i * nb + k, g)));
                if (type == T_Q6_K && g0 >= 4) I2[i] = V_ADDI(I2[i], _mm256_madd_epi16(s, ones));
                else I[i] = V_ADDI(I[i], _mm256_madd_epi16(s, ones));
            }
        }
#endif
        const vf_t cw = V_LOADF((const float *)(pb + 8 * VB));
        const vf_t mw = has_min ? V_LOADF((const float *)(pb + 9 * VB)) : V_ZEROF();
        const vi_t sc0 = type == T_Q6_K ? V_LOADI(pb + 10 * VB) : V_ZEROI();
        const vi_t sc1 = type == T_Q6_K ? V_LOADI(pb + 11 * VB) : V_ZEROI();
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const xblock *xb = x + i * nb + k;
            const vi_t Ii = type == T_Q6_K ? V_ADDI(V_MULLO(I[i], sc0), V_MULLO(I2[i], sc1)) : I[i];
            acc[i] = V_FMA(V_MUL(cw, V_SET1F(xb->d)), V_CVT(Ii), acc[i]);
            if (has_min && !split) accm[i] = V_FMA(mw, V_SET1F(xb->ds), accm[i]);
        }
    }
    /* AVX2's 16 registers cannot hold the min-term accumulators beside the main loop's (one was
     * spilled to the stack, a store and a load per block): they take their own pass over the
     * panel, each in the same order as in the loop, so the same bits */
    for (int k = 0; split && k < kc; k++) {
        const vf_t mw = V_LOADF((const float *)(panel + (size_t)k * PB + 9 * VB));
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) accm[i] = V_FMA(mw, V_SET1F(x[i * nb + k].ds), accm[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        if (!last) {
            V_STOREF(abuf + i * NRP, acc[i]);
            if (has_min) V_STOREF(mbuf + i * NRP, accm[i]);
            continue;
        }
        const vf_t o = has_min ? V_ADD(acc[i], accm[i]) : acc[i];
        FN(store_row)(out + i * ldo, o, nr);
    }
}

#if TILES
/* AMX: 16 activation rows times a panel of kc blocks, a tile multiply per block. tdpbsud (tdpbssd
 * where the panel's codes are signed: amx_signed) takes the rows' signed codes (A: 16 rows of 32 bytes, packed by amx_pack so that a tile load reads
 * 512 contiguous bytes instead of 16 half-used lines of the row-major blocks) and the panel
 * block's 8 code vectors, already the K-by-4 layout of a B tile, and makes the same exact int32
 * sums as kern's vpdpbusd; the float steps after are kern's, in its order, so the result has
 * kern's bits. Two sets of tiles alternate, so the next block's multiply runs while this one's
 * sums are scaled. The min terms (Q4_1, Q4_K) take their own
 * pass, each accumulator in kern's order: 16 rows of both do not fit the registers. Q6_K's two
 * half sums per block stay with kern. The tile configuration is the caller's (amx_begin). */
/* A 16-row group's block, packed for the tiles (amx_pack): the 16 rows' codes (the A tile, 32
 * bytes a row), then per row the block's d and ds. No offset: Q4_0 and Q8_0 panels hold signed
 * codes (amx_signed), Q4_1 and Q4_K have none. */
#define AMX_XQ 0
#define AMX_XD 512
#define AMX_XDS 576
#define AMX_XB 640
/* C = A times B: tdpbssd (signed codes) or tdpbsud (unsigned), as the constant `sgn` says */
#define AMX_MUL_OP(OP, C, A, B, xa, wb)                                                              \
    __asm__ volatile("tilezero %%tmm" #C "\n\ttileloadd (%[a],%[as],1), %%tmm" #A                    \
                     "\n\ttileloadd (%[b],%[bs],1), %%tmm" #B "\n\t" OP " %%tmm" #B ", %%tmm" #A     \
                     ", %%tmm" #C                                                                    \
                     :                                                                               \
                     : [a] "r"(xa), [as] "r"((int64_t)32), [b] "r"(wb), [bs] "r"((int64_t)VB)         \
                     : "memory")
#define AMX_MUL(C, A, B, xa, wb)                                                                     \
    do {                                                                                             \
        if (sgn) AMX_MUL_OP("tdpbssd", C, A, B, xa, wb);                                             \
        else AMX_MUL_OP("tdpbsud", C, A, B, xa, wb);                                                 \
    } while (0)
#define AMX_STORE(C, dst) \
    __asm__ volatile("tilestored %%tmm" #C ", (%[c],%[cs],1)" : : [c] "r"(dst), [cs] "r"((int64_t)64) : "memory")

/* Rows 16g .. 16g + 15 of x (M rows of nb blocks), every block, into xa (nb * AMX_XB bytes);
 * rows from M on are zeros (a last group's padding: its sums are never stored). */
static AI void FN(amx_pack)(const xblock *x, int64_t M, int64_t nb, int64_t g, uint8_t *xa) {
    for (int64_t b = 0; b < nb; b++) {
        uint8_t *pb = xa + b * AMX_XB;
        for (int r = 0; r < 16; r++) {
            if (16 * g + r >= M) {
                memset(pb + AMX_XQ + 32 * r, 0, 32);
                ((float *)(pb + AMX_XD))[r] = ((float *)(pb + AMX_XDS))[r] = 0.0f;
                continue;
            }
            const xblock *xb = x + (16 * g + r) * nb + b;
            memcpy(pb + AMX_XQ + 32 * r, xb->q, 32);
            ((float *)(pb + AMX_XD))[r] = xb->d;
            ((float *)(pb + AMX_XDS))[r] = xb->ds;
        }
    }
}

static AI void FN(amx_scale)(const uint8_t *xb, const uint8_t *pb, const int32_t *c, vf_t acc[16]) {
    const vf_t cw = V_LOADF((const float *)(pb + 8 * VB));
    const float *d = (const float *)(xb + AMX_XD);
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        acc[i] = V_FMA(V_MUL(cw, V_SET1F(d[i])), V_CVT(V_LOADI(c + 16 * i)), acc[i]);
    }
}

/* The codes of Q4_0 and Q8_0, signed in the panel (u - 8 and q): tdpbssd's sums are then the
 * vector kernel's sums after its offset, -(sx << sh), which is exact integer arithmetic. Q4_1 and
 * Q4_K have no offset (their min term is its own pass). */
static AI int FN(amx_signed)(int type) { return type == T_Q4_0 || type == T_Q8_0; }

/* The panel's kc blocks of Q4_0 / Q8_0 codes, as unpack leaves them for vpdpbusd (unsigned),
 * made signed for tdpbssd. */
static AI void FN(amx_sign_panel)(int type, uint8_t *panel, int kc) {
    for (int k = 0; k < kc; k++)
        for (int g = 0; g < 8; g++) {
            uint8_t *v = panel + (size_t)k * PB + g * VB;
            V_STOREI(v, type == T_Q4_0 ? _mm512_sub_epi8(V_LOADI(v), V_SET1B(8)) : V_XOR(V_LOADI(v), V_SET1B((char)0x80)));
        }
}

/* xa: the group's packed blocks from this panel's first (kc of them, AMX_XB bytes apart); rows:
 * the group's rows that exist (the outputs stored). */
static AI void FN(kern_amx_t)(const int type, const uint8_t *xa, int kc, const uint8_t *panel, float *abuf,
                              float *mbuf, int first, int last, float *out, int64_t ldo, int nr, int rows) {
    const int has_min = type == T_Q4_1 || type == T_Q4_K, sgn = FN(amx_signed)(type);
    int32_t c0[16 * 16] __attribute__((aligned(64))), c1[16 * 16] __attribute__((aligned(64)));
    vf_t acc[16];
    if (has_min) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) acc[i] = first ? V_ZEROF() : V_LOADF(mbuf + i * NRP);
        for (int k = 0; k < kc; k++) {
            const vf_t mw = V_LOADF((const float *)(panel + (size_t)k * PB + 9 * VB));
            const float *ds = (const float *)(xa + (size_t)k * AMX_XB + AMX_XDS);
#pragma GCC unroll 16
            for (int i = 0; i < 16; i++) acc[i] = V_FMA(mw, V_SET1F(ds[i]), acc[i]);
        }
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) V_STOREF(mbuf + i * NRP, acc[i]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = first ? V_ZEROF() : V_LOADF(abuf + i * NRP);
    /* block k's sums go to c0 / c1 (k even / odd) and are read after the next block's store: a
     * load right after a tile store waits for the store to reach the cache */
#define XA(k) (xa + (size_t)(k) * AMX_XB)
    AMX_MUL(0, 1, 2, XA(0), panel);
    if (kc > 1) AMX_MUL(3, 4, 5, XA(1), panel + PB);
    for (int k = 0; k < kc; k += 2) {
        const uint8_t *pb = panel + (size_t)k * PB;
        AMX_STORE(0, c0);
        if (k + 2 < kc) AMX_MUL(0, 1, 2, XA(k + 2), pb + 2 * PB);
        if (k > 0) FN(amx_scale)(XA(k - 1), pb - PB, c1, acc);
        if (k + 1 < kc) {
            AMX_STORE(3, c1);
            if (k + 3 < kc) AMX_MUL(3, 4, 5, XA(k + 3), pb + 3 * PB);
            FN(amx_scale)(XA(k), pb, c0, acc);
        }
    }
    if (kc & 1) FN(amx_scale)(XA(kc - 1), panel + (size_t)(kc - 1) * PB, c0, acc);
    else FN(amx_scale)(XA(kc - 1), panel + (size_t)(kc - 1) * PB, c1, acc);
#undef XA
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        if (!last) {
            V_STOREF(abuf + i * NRP, acc[i]);
            continue;
        }
        if (i < rows) FN(store_row)(out + i * ldo, has_min ? V_ADD(acc[i], V_LOADF(mbuf + i * NRP)) : acc[i], nr);
    }
}
#undef AMX_MUL
#undef AMX_MUL_OP
#undef AMX_STORE

/* kern_amx_t with the type a constant in each case */
static __attribute__((noinline)) void FN(kern_amx)(int type, const uint8_t *xa, int kc, const uint8_t *panel,
                                                   float *abuf, float *mbuf, int first, int last, float *out,
                                                   int64_t ldo, int nr, int rows) {
    switch (type) {
    case T_Q4_0: FN(kern_amx_t)(T_Q4_0, xa, kc, panel, abuf, mbuf, first, last, out, ldo, nr, rows); break;
    case T_Q4_1: FN(kern_amx_t)(T_Q4_1, xa, kc, panel, abuf, mbuf, first, last, out, ldo, nr, rows); break;
    case T_Q8_0: FN(kern_amx_t)(T_Q8_0, xa, kc, panel, abuf, mbuf, first, last, out, ldo, nr, rows); break;
    case T_Q4_K: FN(kern_amx_t)(T_Q4_K, xa, kc, panel, abuf, mbuf, first, last, out, ldo, nr, rows); break;
    }
}

/* This thread's tile shapes for kern_amx, two sets: tmm0 / tmm3 the 16 x 16 int32 sums, tmm1 /
 * tmm4 16 activation rows of 32 codes, tmm2 / tmm5 one panel block (8 rows of 64 bytes). */
static void FN(amx_begin)(void) {
    uint8_t cfg[64] __attribute__((aligned(64))) = {0};
    cfg[0] = 1; /* palette 1 */
    const uint16_t colsb[6] = {64, 32, 64, 64, 32, 64};
    const uint8_t rows[6] = {16, 16, 8, 16, 16, 8};
    memcpy(cfg + 16, colsb, sizeof colsb);
    memcpy(cfg + 48, rows, sizeof rows);
    __asm__ volatile("ldtilecfg %0" : : "m"(cfg) : "memory");
}

static void FN(amx_end)(void) { __asm__ volatile("tilerelease" ::: "memory"); }
#endif

#define KERN_MR(T)                                                                                   \
    case T:                                                                                          \
        switch (mr) {                                                                                \
        case 1: FN(kern)(T, 1, x, nb, kc, panel, abuf, mbuf, first, last, out, ldo, nr); break;      \
        case 2: FN(kern)(T, 2, x, nb, kc, panel, abuf, mbuf, first, last, out, ldo, nr); break;      \
        case 3: FN(kern)(T, MR >= 3 ? 3 : 1, x, nb, kc, panel, abuf, mbuf, first, last, out, ldo, nr); break; \
        default: FN(kern)(T, MR >= 4 ? 4 : 1, x, nb, kc, panel, abuf, mbuf, first, last, out, ldo, nr); break; \
        }                                                                                            \
        break;

static __attribute__((noinline)) void FN(run_kern)(int type, int mr, const xblock *x, int64_t nb, int kc,
                                                   const uint8_t *panel, float *abuf, float *mbuf, int first,
                                                   int last, float *out, int64_t ldo, int nr) {
    switch (type) {
        KERN_MR(T_Q4_0)
        KERN_MR(T_Q4_1)
        KERN_MR(T_Q8_0)
        KERN_MR(T_Q4_K)
        KERN_MR(T_Q6_K)
    }
}
#undef KERN_MR

#if !VNNI
/* s[i] += the products of activation row i with panel A's code vector g, s[2 + i] with panel B's:
 * each broadcast feeds two tiles, so a block costs 16 code-vector loads and 8 broadcasts per row
 * for 16 weight rows, against 8 and 8 for 8 in q4group. In asm for the reason given there. */
static AI void FN(q4group2)(const int mr, __m256i s[4], const uint8_t *wa, const uint8_t *wb, const xblock *x0,
                            int64_t nb, int g) {
    __m256i A, B, t0, t1, p0;
    const int32_t *a0 = (const int32_t *)(x0->q + 4 * g);
    if (mr == 1) {
        __asm__("vmovdqa %[wa], %[A]\n\tvmovdqa %[wb], %[B]\n\tvpbroadcastd %[a0], %[t0]\n\t"
                "vpmaddubsw %[t0], %[A], %[p0]\n\tvpmaddubsw %[t0], %[B], %[t0]\n\t"
                "vpaddw %[p0], %[s0], %[s0]\n\tvpaddw %[t0], %[s2], %[s2]"
                : [s0] "+x"(s[0]), [s2] "+x"(s[2]), [A] "=&x"(A), [B] "=&x"(B), [t0] "=&x"(t0), [p0] "=&x"(p0)
                : [wa] "m"(*(const __m256i *)wa), [wb] "m"(*(const __m256i *)wb), [a0] "m"(*a0));
    } else {
        const int32_t *a1 = (const int32_t *)(x0[nb].q + 4 * g);
        __asm__("vmovdqa %[wa], %[A]\n\tvmovdqa %[wb], %[B]\n\tvpbroadcastd %[a0], %[t0]\n\tvpbroadcastd %[a1], %[t1]\n\t"
                "vpmaddubsw %[t0], %[A], %[p0]\n\tvpmaddubsw %[t0], %[B], %[t0]\n\t"
                "vpaddw %[p0], %[s0], %[s0]\n\tvpaddw %[t0], %[s2], %[s2]\n\t"
                "vpmaddubsw %[t1], %[A], %[p0]\n\tvpmaddubsw %[t1], %[B], %[t1]\n\t"
                "vpaddw %[p0], %[s1], %[s1]\n\tvpaddw %[t1], %[s3], %[s3]"
                : [s0] "+x"(s[0]), [s1] "+x"(s[1]), [s2] "+x"(s[2]), [s3] "+x"(s[3]), [A] "=&x"(A), [B] "=&x"(B),
                  [t0] "=&x"(t0), [t1] "=&x"(t1), [p0] "=&x"(p0)
                : [wa] "m"(*(const __m256i *)wa), [wb] "m"(*(const __m256i *)wb), [a0] "m"(*a0), [a1] "m"(*a1));
    }
}

/* kern for the Q4 types on two panels at once (tiles n and n + NRP, the same kb), mr <= 4 rows:
 * per (m, n) and block the same exact I and the same float sequences as kern, so the same bits.
 * The blocks go two activation rows at a time (q4group2's registers), the block sums through
 * abuf; the min terms (Q4_1, Q4_K) then take one pass for all mr rows: 2 * mr chains of fmas,
 * where 4 leave the pass waiting on the fma latency. */
static AI void FN(kern2)(const int type, const int mr, const xblock *x, int64_t nb, int kc, const uint8_t *pa,
                         const uint8_t *pbb, float *abuf[2], float *mbuf[2], int first, int last, float *out[2],
                         int64_t ldo, const int nr[2]) {
    const int sh = off_shift(type);
    const int has_min = type == T_Q4_1 || type == T_Q4_K;
    const uint8_t *panels[2] = {pa, pbb};
    const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 2
    for (int r0 = 0; r0 < mr; r0 += 2) {
        const int rows = mr - r0 < 2 ? mr - r0 : 2;
        const xblock *xr = x + r0 * nb;
        vf_t acc[2][2];
#pragma GCC unroll 2
        for (int p = 0; p < 2; p++)
#pragma GCC unroll 2
            for (int i = 0; i < rows; i++) acc[p][i] = first ? V_ZEROF() : V_LOADF(abuf[p] + (r0 + i) * NRP);
        for (int k = 0; k < kc; k++) {
            __m256i s[4] = {V_ZEROI(), V_ZEROI(), V_ZEROI(), V_ZEROI()};
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++)
                FN(q4group2)(rows, s, pa + (size_t)k * PB + g * VB, pbb + (size_t)k * PB + g * VB, xr + k, nb, g);
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) {
                const vf_t cw = V_LOADF((const float *)(panels[p] + (size_t)k * PB + 8 * VB));
#pragma GCC unroll 2
                for (int i = 0; i < rows; i++) {
                    const xblock *xb = xr + i * nb + k;
                    const vi_t I = V_ADDI(sh >= 0 ? V_SET1I(-(xb->sx << sh)) : V_ZEROI(),
                                          _mm256_madd_epi16(s[2 * p + i], ones));
                    acc[p][i] = V_FMA(V_MUL(cw, V_SET1F(xb->d)), V_CVT(I), acc[p][i]);
                }
            }
        }
#pragma GCC unroll 2
        for (int p = 0; p < 2; p++)
#pragma GCC unroll 2
            for (int i = 0; i < rows; i++) V_STOREF(abuf[p] + (r0 + i) * NRP, acc[p][i]);
    }
    vf_t accm[2][4];
    if (has_min) {
#pragma GCC unroll 2
        for (int p = 0; p < 2; p++)
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) accm[p][i] = first ? V_ZEROF() : V_LOADF(mbuf[p] + i * NRP);
        for (int k = 0; k < kc; k++) {
#pragma GCC unroll 2
            for (int p = 0; p < 2; p++) {
                const vf_t mw = V_LOADF((const float *)(panels[p] + (size_t)k * PB + 9 * VB));
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) accm[p][i] = V_FMA(mw, V_SET1F(x[i * nb + k].ds), accm[p][i]);
            }
        }
    }
#pragma GCC unroll 2
    for (int p = 0; p < 2; p++)
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            if (!last) {
                if (has_min) V_STOREF(mbuf[p] + i * NRP, accm[p][i]);
                continue;
            }
            const vf_t acc = V_LOADF(abuf[p] + i * NRP);
            const vf_t o = has_min ? V_ADD(acc, accm[p][i]) : acc;
            FN(store_row)(out[p] + i * ldo, o, nr[p]);
        }
}

static __attribute__((noinline)) void FN(run_kern2)(int type, int mr, const xblock *x, int64_t nb, int kc,
                                                    const uint8_t *pa, const uint8_t *pbb, float *abuf[2],
                                                    float *mbuf[2], int first, int last, float *out[2], int64_t ldo,
                                                    const int nr[2]) {
#define KERN2(T)                                                                                                  \
    case T:                                                                                                       \
        switch (mr) {                                                                                             \
        case 1: FN(kern2)(T, 1, x, nb, kc, pa, pbb, abuf, mbuf, first, last, out, ldo, nr); break;                \
        case 2: FN(kern2)(T, 2, x, nb, kc, pa, pbb, abuf, mbuf, first, last, out, ldo, nr); break;                \
        case 3: FN(kern2)(T, 3, x, nb, kc, pa, pbb, abuf, mbuf, first, last, out, ldo, nr); break;                \
        default: FN(kern2)(T, 4, x, nb, kc, pa, pbb, abuf, mbuf, first, last, out, ldo, nr); break;               \
        }                                                                                                         \
        break;
    switch (type) {
        KERN2(T_Q4_0)
        KERN2(T_Q4_1)
        KERN2(T_Q4_K)
    }
#undef KERN2
}
#endif

/* ------------------------------------------------------------------ the tiled layout (ggml.c TILED)
 * Q4_0, Q4_1 and Q8_0 rows regrouped by 16: per group, block after block, the codes as the
 * dot-product instructions read them (vector g: bytes 4g..4g+3 of each of the 16 rows, lane r =
 * row r; a Q4 byte holds codes j and j + 16), then every block's 16 float16 scales d, then (Q4_1)
 * its 16 mins. A block costs 4 (Q8_0: 8) aligned vector loads and one scale load for 16 rows,
 * where the file's row layout takes 16 row loads, their inserts, a gather and a lane reduction.
 * Q6_K groups hold superblock after superblock, each as its 4-byte columns of the 16 rows (ggml.c
 * T6_SB, t6pos). The AVX2 tile of 8 rows is half a group: the low or high 32 bytes of each vector. */

/* NRP float16 values at p as floats */
static AI vf_t FN(th16)(const uint8_t *p) {
#if VNNI
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
}

static AI vi_t FN(tload)(const uint8_t *p) {
#if VNNI
    return _mm512_loadu_si512((const void *)p);
#else
    return _mm256_loadu_si256((const __m256i *)p);
#endif
}

/* The 8 code vectors of block b of a tile (tw: its group, half: which 8 rows for AVX2), as the
 * panel holds them: group g = codes 4g..4g+3, Q8_0 with VNNI's sign flip. */
static AI void FN(tcodes)(const int type, const uint8_t *tw, int64_t b, int half, vi_t c[8]) {
    const uint8_t *p = tw + b * 16 * TCB(type) + half * 32;
    if (type == T_Q8_0) {
        const vi_t flip = VNNI ? V_SET1B((char)0x80) : V_ZEROI();
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) c[g] = V_XOR(FN(tload)(p + 64 * g), flip);
        return;
    }
    const vi_t m4 = V_SET1B(15);
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        const vi_t v = FN(tload)(p + 64 * g);
        c[g] = V_AND(v, m4);
        c[g + 4] = V_AND(V_SRLI16(v, 4), m4);
    }
}

#if VNNI
/* ggml.c's mlm_ggml_tile for 16-row groups g0 .. g1 - 1: each block's codes of the 16 rows as
 * load4 reads them, transposed by t4 into the four (Q8_0: eight) vectors of the layout; the
 * scales (and mins) two bytes a row. The same bytes as the scalar copy (ggml.py reference_tile). */
static void FN(tile_groups)(const int type, const uint8_t *src, int64_t nb, int64_t g0, int64_t g1, uint8_t *dst) {
    const int64_t tb = type_bytes(type), ldw = nb * tb;
    const int cb = TCB(type), head = THEAD(type);
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *rp[16];
        for (int r = 0; r < 16; r++) rp[r] = src + (g * 16 + r) * ldw;
        uint8_t *codes = dst + g * 16 * ldw, *d = codes + nb * 16 * cb, *m = d + nb * 32;
        for (int64_t b = 0; b < nb; b++) {
            for (int part = 0; part < cb / 16; part++) {
                vi_t z[4], out[4];
                for (int a = 0; a < 4; a++) z[a] = FN(load4)(rp, a, b * tb + head + 16 * part);
                FN(t4)(z, out);
                for (int k = 0; k < 4; k++) _mm512_storeu_si512((void *)(codes + b * 16 * cb + 256 * part + 64 * k), out[k]);
            }
            for (int r = 0; r < 16; r++) {
                memcpy(d + b * 32 + 2 * r, rp[r] + b * tb, 2);
                if (type == T_Q4_1) memcpy(m + b * 32 + 2 * r, rp[r] + b * tb + 2, 2);
            }
        }
    }
}
#endif

/* Prefetches a group's codes of the K chunk from block b, for the prefill's panels (a group is one
 * stream; its scales are read a few at a time and left to the hardware's prefetcher). */
static AI void FN(tprefetch)(const int type, const uint8_t *tw, int64_t b, int64_t nb) {
    const int64_t e = b + KC < nb ? b + KC : nb;
    if (type == T_Q6_K) { /* b and e are superblock starts (KC is a multiple of 8) */
        for (int64_t o = (b >> 3) * T6_SB; o < (e >> 3) * T6_SB; o += 64) _mm_prefetch((const char *)(tw + o), _MM_HINT_T0);
        return;
    }
    const int64_t cb = 16 * TCB(type);
    for (int64_t o = b * cb; o < e * cb; o += 64) _mm_prefetch((const char *)(tw + o), _MM_HINT_T0);
}

/* Block t's codes (t = 0..3 of a superblock half) from a loaded ql column q (the even blocks'
 * for t = 0, 2, the odd blocks' for t = 1, 3) and qh column: q's low (t < 2) or high nibbles,
 * with qh's bits 2t and 2t + 1 as bits 4 and 5, as decode_scalar reads them. */
static AI vi_t FN(t6u)(vi_t q, vi_t qh, const int t) {
    const vi_t lo = (t & 2) ? V_AND(V_SRLI16(q, 4), V_SET1B(15)) : V_AND(q, V_SET1B(15));
    const vi_t hb = t == 0 ? V_SLLI16(qh, 4) : t == 1 ? V_SLLI16(qh, 2) : t == 2 ? qh : V_SRLI16(qh, 2);
    return V_OR(lo, V_AND(hb, V_SET1B(0x30)));
}

/* Code vector g of block (h, t) = 4h + t of a tiled Q6_K superblock (sp: its start, plus the
 * AVX2 half's 32 bytes), for the prefill's panels: from ql's column 16h + 8(t & 1) + g and qh's
 * column 32 + 8h + g. */
static AI vi_t FN(t6code)(const uint8_t *sp, const int h, const int t, const int g) {
    return FN(t6u)(FN(tload)(sp + 64 * t6pos(16 * h + 8 * (t & 1) + g)), FN(tload)(sp + 64 * t6pos(32 + 8 * h + g)), t);
}

/* Block j's two int8 scales of a tiled Q6_K superblock (bytes 2j and 2j + 1 of the rows' scale
 * columns 48-51), sign-extended into each row's lane. */
static AI void FN(t6scales)(const uint8_t *sp, const int j, vi_t *s0, vi_t *s1) {
    const vi_t v = FN(tload)(sp + 64 * t6pos(48 + (j >> 1)));
    const int k0 = (2 * j) & 3;
    *s0 = V_SRAI32(V_SLLI32(v, 24 - 8 * k0), 24);
    *s1 = V_SRAI32(V_SLLI32(v, 16 - 8 * k0), 24);
}

/* Blocks b0 .. b0 + kc - 1 of a tile into the panel (prefill). */
static __attribute__((noinline)) void FN(tunpack)(int type, const uint8_t *tw, int64_t nb, int half, int64_t b0,
                                                  int kc, uint8_t *panel) {
    if (type == T_Q6_K) {
        for (int k = 0; k < kc; k++) {
            const int64_t b = b0 + k;
            const int j = (int)(b & 7);
            const uint8_t *sp = tw + (b >> 3) * T6_SB;
            uint8_t *pb = panel + (size_t)k * PB;
            vi_t s0, s1;
#pragma GCC unroll 8
            for (int g = 0; g < 8; g++) V_STOREI(pb + g * VB, FN(t6code)(sp + half * 32, j >> 2, j & 3, g));
            FN(t6scales)(sp + half * 32, j, &s0, &s1);
            V_STOREF((float *)(pb + 8 * VB), FN(th16)(sp + T6_D + half * 2 * NRP));
            V_STOREF((float *)(pb + 9 * VB), V_ZEROF());
            V_STOREI(pb + 10 * VB, s0);
            V_STOREI(pb + 11 * VB, s1);
        }
        return;
    }
    const uint8_t *sd = tw + nb * 16 * TCB(type) + half * 2 * NRP, *sm = sd + nb * 32;
    for (int k = 0; k < kc; k++) {
        uint8_t *pb = panel + (size_t)k * PB;
        vi_t c[8];
        if (type == T_Q8_0) FN(tcodes)(T_Q8_0, tw, b0 + k, half, c);
        else FN(tcodes)(T_Q4_0, tw, b0 + k, half, c);
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) V_STOREI(pb + g * VB, c[g]);
        V_STOREF((float *)(pb + 8 * VB), FN(th16)(sd + (b0 + k) * 32));
        V_STOREF((float *)(pb + 9 * VB), type == T_Q4_1 ? FN(th16)(sm + (b0 + k) * 32) : V_ZEROF());
    }
}

/* Q6_K on a tile (decode), half a superblock (blocks 4h .. 4h + 3) a pass: a group g's three
 * columns (the ql of the even blocks and of the odd ones, and the qh) give all four blocks' code
 * vectors g by a mask and a shift each; the two 16-element halves' exact sums are scaled by each
 * block's int8 scales, then kern's float step in block order. No lane reductions and no gathers,
 * which held the file's rows to about 18 GB/s; a block a pass (t6code: each ql column loaded
 * twice, each qh column four times) reached no more (bench/RESULTS.md). AVX2 takes the group's
 * 8-row halves in turn, the second from L1. A superblock is one 3,360-byte stretch of the
 * group's stream; the lead runs T6_LEAD superblocks ahead, into the next group past this one's
 * end (groups lie end to end). */
#ifndef T6_LEAD
#define T6_LEAD 2
#endif
static AI void FN(tdirect6)(const int mr, const int halves, const xblock *x, int64_t nb, const uint8_t *tw, int half,
                            float *out, int64_t ldo, int nr) {
    vf_t acc[2][MR];
#pragma GCC unroll 2
    for (int hh = 0; hh < halves; hh++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[hh][i] = V_ZEROF();
    for (int64_t s = 0; s < nb >> 3; s++) {
        const uint8_t *sp = tw + s * T6_SB;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const uint8_t *pf = sp + T6_LEAD * T6_SB + h * 28 * 64; /* half the superblock's lines */
#pragma GCC unroll 28
            for (int l = 0; l < 28; l++) _mm_prefetch((const char *)(pf + 64 * l), _MM_HINT_T1);
            const int64_t b = 8 * s + 4 * h;
#pragma GCC unroll 2
            for (int hh = 0; hh < halves; hh++) {
                const uint8_t *hp = sp + (half + hh) * 32;
                vi_t I0[4][MR], I1[4][MR]; /* per block t: the sums over codes 0..15 and 16..31, offsets included */
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++)
#pragma GCC unroll 8
                    for (int i = 0; i < mr; i++) {
                        const xblock *xb = x + i * nb + b + t;
                        I0[t][i] = V_SET1I(-(xb->sxl << 5));
                        I1[t][i] = V_SET1I(-((xb->sx - xb->sxl) << 5));
                    }
#pragma GCC unroll 8
                for (int g = 0; g < 8; g++) {
                    const vi_t qe = FN(tload)(hp + 64 * t6pos(16 * h + g)), qo = FN(tload)(hp + 64 * t6pos(16 * h + 8 + g));
                    const vi_t qh = FN(tload)(hp + 64 * t6pos(32 + 8 * h + g));
#pragma GCC unroll 4
                    for (int t = 0; t < 4; t++) {
                        const vi_t u = FN(t6u)((t & 1) ? qo : qe, qh, t);
#pragma GCC unroll 8
                        for (int i = 0; i < mr; i++) {
                            const xblock *xb = x + i * nb + b + t;
#if VNNI
                            const vi_t I = FN(dpbusd_x)(g < 4 ? I0[t][i] : I1[t][i], u, xb, g);
#else /* a group's int16 pair sums cannot overflow: codes <= 63 */
                            const vi_t I = V_ADDI(g < 4 ? I0[t][i] : I1[t][i],
                                                  _mm256_madd_epi16(FN(mad16)(T_Q6_K, u, FN(xword)(xb, g)),
                                                                    _mm256_set1_epi16(1)));
#endif
                            if (g < 4) I0[t][i] = I;
                            else I1[t][i] = I;
                        }
                    }
                }
                const vf_t cw = FN(th16)(sp + T6_D + (half + hh) * 2 * NRP);
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++) {
                    vi_t s0, s1;
                    FN(t6scales)(hp, 4 * h + t, &s0, &s1);
#pragma GCC unroll 8
                    for (int i = 0; i < mr; i++) {
                        const vi_t I = V_ADDI(V_MULLO(I0[t][i], s0), V_MULLO(I1[t][i], s1));
                        acc[hh][i] = V_FMA(V_MUL(cw, V_SET1F(x[i * nb + b + t].d)), V_CVT(I), acc[hh][i]);
                    }
                }
            }
        }
    }
#pragma GCC unroll 2
    for (int hh = 0; hh < halves; hh++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) FN(store_row)(out + i * ldo + hh * NRP, acc[hh][i], nr);
}

/* Small M (decode) on a tile: kern's sequence, block after block, straight from the tiled codes.
 * `halves` = 2 (AVX2 only: a group is two 8-row tiles) takes both halves of the group in one pass,
 * so each code line is read once, from memory, for 16 rows; out then holds 16 outputs. */
static AI void FN(tdirect)(const int type, const int mr, const int halves, const xblock *x, int64_t nb,
                           const uint8_t *tw, int half, float *out, int64_t ldo, int nr) {
    if (type == T_Q6_K) {
        FN(tdirect6)(mr, halves, x, nb, tw, half, out, ldo, nr);
        return;
    }
    const int sh = off_shift(type) - (!VNNI && type == T_Q8_0 ? 8 : 0);
    const int has_min = type == T_Q4_1;
    const uint8_t *sd = tw + nb * 16 * TCB(type) + half * 2 * NRP, *sm = sd + nb * 32;
    vf_t acc[2][MR], accm[2][MR];
#pragma GCC unroll 2
    for (int h = 0; h < halves; h++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) acc[h][i] = accm[h][i] = V_ZEROF();
    /* The group's scales (and Q4_1's mins) are a second stream, 32 bytes a block, that each block
     * waits on: left to the hardware prefetcher, which starts over at every group, a token's
     * stalls sat on their loads. Its first lines now go out with the group's first codes, the
     * rest TPS blocks ahead (bench/RESULTS.md). */
    const uint8_t *sbase = tw + nb * 16 * TCB(type);
    /* The next group (prefetching past a thread's last one, or past the matrix, loads nothing
     * that is used, and faults never). The leads used to stop at the group's end: its last codes'
     * lead fell on its own scales and the next group began with a memory latency on its first
     * scales; a 1B's product sequence, 64 blocks a row, ran 1.16x faster with the leads carried
     * over (bench/RESULTS.md). */
    const uint8_t *next = sbase + nb * 32 * (1 + has_min);
#ifndef TPS
#define TPS 32
#endif
    for (int64_t b = 0; b < TPS && b < nb; b += 2) {
        _mm_prefetch((const char *)(sbase + b * 32), _MM_HINT_T0);
        if (has_min) _mm_prefetch((const char *)(sbase + (nb + b) * 32), _MM_HINT_T0);
    }
    for (int64_t b = 0; b < nb; b++) {
        /* The codes' lead goes into L2, not L1: its lines waited in L1's few miss buffers, and on an
         * AMD EPYC (Zen 4) a 16-block lead into L1 streamed a 7B's matrices at 0.8x the file's rows
         * (bench/RESULTS.md). */
#ifndef TPF
#define TPF 32
#endif
        {   /* both leads run on into the next tile's group, where this thread goes next */
            const int64_t pb = b + TPF, sb = b + TPS;
            const uint8_t *cp = pb < nb ? tw + pb * 16 * TCB(type) : next + (pb - nb) * 16 * TCB(type);
            for (int l = 0; l < TCB(type) / 4; l++) _mm_prefetch((const char *)(cp + 64 * l), _MM_HINT_T1);
            if (!(b & 1)) { /* a 64-byte line holds two blocks' scales */
                const uint8_t *sp = sb < nb ? sbase + sb * 32 : next + nb * 16 * TCB(type) + (sb - nb) * 32;
                _mm_prefetch((const char *)sp, _MM_HINT_T0);
                if (has_min) _mm_prefetch((const char *)(sp + nb * 32), _MM_HINT_T0);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < halves; h++) {
            vi_t c[8], I[MR];
            FN(tcodes)(type, tw, b, half + h, c);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                const xblock *xb = x + i * nb + b;
                I[i] = sh >= 0 ? V_SET1I(-(xb->sx << sh)) : V_ZEROI();
#if VNNI
#pragma GCC unroll 8
                for (int g = 0; g < 8; g++) I[i] = FN(dpbusd_x)(I[i], c[g], xb, g);
#else
                const __m256i ones = _mm256_set1_epi16(1);
                if (type == T_Q8_0) {
#pragma GCC unroll 8
                    for (int g = 0; g < 8; g++)
                        I[i] = V_ADDI(I[i], _mm256_madd_epi16(FN(mad16)(type, c[g], FN(xword)(xb, g)), ones));
                } else { /* int16 sums of the 8 groups cannot overflow: codes <= 15 */
                    __m256i sum = FN(mad16)(type, c[0], FN(xword)(xb, 0));
#pragma GCC unroll 8
                    for (int g = 1; g < 8; g++) sum = _mm256_add_epi16(sum, FN(mad16)(type, c[g], FN(xword)(xb, g)));
                    I[i] = V_ADDI(I[i], _mm256_madd_epi16(sum, ones));
                }
#endif
            }
            const vf_t cw = FN(th16)(sd + b * 32 + h * 2 * NRP);
            const vf_t mw = has_min ? FN(th16)(sm + b * 32 + h * 2 * NRP) : V_ZEROF();
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                const xblock *xb = x + i * nb + b;
                acc[h][i] = V_FMA(V_MUL(cw, V_SET1F(xb->d)), V_CVT(I[i]), acc[h][i]);
                if (has_min) accm[h][i] = V_FMA(mw, V_SET1F(xb->ds), accm[h][i]);
            }
        }
    }
#pragma GCC unroll 2
    for (int h = 0; h < halves; h++)
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
            FN(store_row)(out + i * ldo + h * NRP, has_min ? V_ADD(acc[h][i], accm[h][i]) : acc[h][i], nr);
}

#define TDIRECT_MR(T)                                                                               \
    case T:                                                                                         \
        if (!VNNI && halves == 2) { /* AVX2's two 8-row halves (VNNI tiles are whole groups) */ \
            if (mr == 1) FN(tdirect)(T, 1, 2, x, nb, tw, half, out, ldo, nr);                       \
            else FN(tdirect)(T, 2, 2, x, nb, tw, half, out, ldo, nr);                               \
        } else if (mr == 1) FN(tdirect)(T, 1, 1, x, nb, tw, half, out, ldo, nr);                   \
        else FN(tdirect)(T, 2, 1, x, nb, tw, half, out, ldo, nr);                                   \
        break;

static __attribute__((noinline)) void FN(run_tdirect)(int type, int mr, int halves, const xblock *x, int64_t nb,
                                                      const uint8_t *tw, int half, float *out, int64_t ldo, int nr) {
    switch (type) {
        TDIRECT_MR(T_Q4_0)
        TDIRECT_MR(T_Q4_1)
        TDIRECT_MR(T_Q8_0)
        TDIRECT_MR(T_Q6_K)
    }
}
#undef TDIRECT_MR

/* Per thread, grown as needed: the panel and the accumulators of an M chunk. */
static __thread uint8_t *FN(tbuf);
static __thread size_t FN(tbuf_size);
#if TILES
static __thread uint8_t *FN(xabuf); /* the caller's packed activations for the tiles */
static __thread size_t FN(xabuf_size);
#endif

/* Prefetch the K range [nkb, nkb + KC) of NRP weight rows (row r at base + off[r], rows past nr
 * skipped): the next panel's weights, while the current one is multiplied. */
static AI void FN(prefetch_panel)(const uint8_t *base, const int32_t *off, int nr, int64_t nkb, int64_t nb, int tb,
                                  int sup) {
    const int64_t lo = (sup ? nkb >> 3 : nkb) * tb, hi = (sup ? (nkb + KC) >> 3 : nkb + KC) * tb;
    const int64_t end = hi < (sup ? nb >> 3 : nb) * tb ? hi : (sup ? nb >> 3 : nb) * tb;
    for (int r = 0; r < nr; r++)
        for (int64_t o = lo; o < end; o += 64) _mm_prefetch((const char *)(base + off[r] + o), _MM_HINT_T0);
}

/* The row pointers and offsets of the tile at weight row n (rows past N repeat the last one). */
static AI int FN(tile_rows)(const uint8_t *w, int64_t N, int64_t ldw, int64_t n, const uint8_t *rp[NRP],
                            int32_t off[NRP]) {
    const int nr = (int)(N - n < NRP ? N - n : NRP);
    for (int r = 0; r < NRP; r++) {
        off[r] = (int32_t)((r < nr ? r : nr - 1) * ldw);
        rp[r] = w + (n + (r < nr ? r : nr - 1)) * ldw;
    }
    return nr;
}

#if TILES
#define AMX_P 32 /* the most weight tiles per pass of the AMX prefill (amx_panels: how many) */
/* One thread's tiles t0 .. t1 - 1 of an AMX prefill: amx_panels tiles per pass, their panels
 * unpacked for one K chunk, then each 16-row group runs over all of them while its packed
 * activations (kc * AMX_XB bytes) stay in L1; one panel per group pass made every tile stream all
 * groups' activations from L2 (or L3 at 7B widths). A last partial group is padded with zero rows. The
 * same sums in the same order per output as one panel at a time. Returns 0, having computed
 * nothing, where its buffers cannot be had (the caller's vector loop then runs). */
static int FN(matmul_amx)(int type, int tl, int64_t M, int64_t nb, const uint8_t *w, int64_t N, int64_t ldw,
                           float *out, int64_t ldo, int64_t mc, const uint8_t *xa, int64_t t0, int64_t t1) {
    const int tb = type_bytes(type), sup = type == T_Q4_K || type == T_Q6_K;
    const int panels = amx_panels;
    const size_t one = (size_t)KC * PB + 2 * sizeof(float) * NRP * (size_t)mc, need = panels * one;
    if (!grown(&FN(tbuf), &FN(tbuf_size), need)) return 0;
    const uint8_t *rp[AMX_P][NRP];
    int32_t off[AMX_P][NRP];
    int nr[AMX_P];
    for (int64_t m0 = 0; m0 < M; m0 += mc) {
        const int64_t m1 = m0 + mc < M ? m0 + mc : M;
        for (int64_t tile0 = t0; tile0 < t1; tile0 += panels) {
            const int np = (int)(t1 - tile0 < panels ? t1 - tile0 : panels);
            for (int p = 0; p < np; p++)
                nr[p] = tl ? NRP : FN(tile_rows)(w, N, ldw, (tile0 + p) * NRP, rp[p], off[p]);
            for (int64_t kb = 0; kb < nb; kb += KC) {
                const int kc = (int)(nb - kb < KC ? nb - kb : KC);
                for (int p = 0; p < np; p++) {
                    uint8_t *panel = FN(tbuf) + p * one;
                    if (tl) { /* a group of the tiled layout: NRP = 16 rows, one stream */
                        FN(tprefetch)(type, w + (tile0 + p) * NRP * ldw, kb + kc, nb);
                        FN(tunpack)(type, w + (tile0 + p) * NRP * ldw, nb, 0, kb, kc, panel);
                    } else {
                        if (kb + kc < nb) FN(prefetch_panel)(rp[p][0], off[p], nr[p], kb + kc, nb, tb, sup);
                        FN(unpack)(type, rp[p], _mm512_loadu_si512(off[p]), kb, kc, panel);
                    }
                    if (FN(amx_signed)(type)) FN(amx_sign_panel)(type, panel, kc);
                }
                for (int64_t i = m0; i < m1; i += 16) { /* the last group may be partial: padded */
                    const uint8_t *xg = xa + ((size_t)(i / 16) * nb + kb) * AMX_XB;
                    const int rows = (int)(m1 - i < 16 ? m1 - i : 16);
                    for (int p = 0; p < np; p++) {
                        uint8_t *panel = FN(tbuf) + p * one;
                        float *abuf = (float *)(panel + (size_t)KC * PB), *mbuf = abuf + NRP * mc;
                        FN(kern_amx)(type, xg, kc, panel, abuf + (i - m0) * NRP, mbuf + (i - m0) * NRP, kb == 0,
                                     kb + kc == nb, out + i * ldo + (tile0 + p) * NRP, ldo, nr[p], rows);
                    }
                }
            }
        }
    }
    return 1;
}
#endif

/* Thread t of nt's share of FN(matmul): its tiles, over every M chunk; 1 where its panel could not
 * be allocated. Called in matmul's parallel region, or directly where one thread computes the
 * product: even an OpenMP region of one thread costs 0.4-0.9 us to make and tear down, and the
 * fused decode step's threads each call ~200 products a token (bench/RESULTS.md). */
static int FN(matmul_share)(int type, int tl, const xblock *x, int64_t M, int64_t nb, const uint8_t *w, int64_t N,
                            int64_t ldw, float *out, int64_t ldo, int64_t mc, int pair, int amx, uint8_t *xa,
                            int64_t t, int64_t nt) {
    const int64_t ntiles = (N + NRP - 1) / NRP;
    const int tb = type_bytes(type), sup = type == T_Q4_K || type == T_Q6_K;
    (void)xa;
    (void)amx;
    (void)tb;
    (void)sup;
    (void)pair;
    int failed = 0;
#if TILES
    if (amx) {
        FN(amx_begin)();
        if (nt > 1) {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < (M + 15) / 16; g++) FN(amx_pack)(x, M, nb, g, xa + (size_t)g * nb * AMX_XB);
        } else { /* called outside matmul's region: an orphaned `omp for` would bind to the caller's team */
            for (int64_t g = 0; g < (M + 15) / 16; g++) FN(amx_pack)(x, M, nb, g, xa + (size_t)g * nb * AMX_XB);
        }
    }
#endif
    const int64_t t0 = ntiles * t / nt, t1 = ntiles * (t + 1) / nt;
    int by_amx = 0; /* this thread's tiles done by matmul_amx */
#if TILES
    if (amx) {
        by_amx = FN(matmul_amx)(type, tl, M, nb, w, N, ldw, out, ldo, mc, xa, t0, t1);
        FN(amx_end)();
    }
#endif
    const size_t one = (size_t)KC * PB + 2 * sizeof(float) * NRP * (size_t)mc;
    /* a panel and its accumulators per tile of a pass */
    uint8_t *panel = by_amx ? NULL : grown(&FN(tbuf), &FN(tbuf_size), (pair ? 2 : 1) * one);
    failed |= !by_amx && !panel && t0 < t1;
    float *abuf = (float *)(panel + (size_t)KC * PB), *mbuf = abuf + NRP * mc;
#if !VNNI
    uint8_t *panel2 = panel + one;
    float *abuf2 = (float *)(panel2 + (size_t)KC * PB), *mbuf2 = abuf2 + NRP * mc;
#endif
    for (int64_t m0 = 0; panel && m0 < M; m0 += mc) {
        const int64_t m1 = m0 + mc < M ? m0 + mc : M;
        for (int64_t tile = t0; tile < t1;) {
            const int two = pair && tile + 1 < t1, step = two ? 2 : 1;
            const int64_t n = tile * NRP;
            const uint8_t *rp[NRP], *rp2[NRP];
            int32_t off[NRP], off2[NRP];
            const int nr = FN(tile_rows)(w, N, ldw, n, rp, off);
            const int nr2 = two ? FN(tile_rows)(w, N, ldw, n + NRP, rp2, off2) : 0;
#if VNNI
            const vi_t idx = _mm512_loadu_si512(off);
#else
            const vi_t idx = _mm256_loadu_si256((const __m256i *)off);
            const vi_t idx2 = two ? _mm256_loadu_si256((const __m256i *)off2) : idx;
#endif
            /* the tiled layout: the tile's group and, for an 8-row tile, its half */
            const uint8_t *tw = w + (n >> 4) * 16 * ldw;
            const int half = (int)((n >> 3) & 1) * (NRP == 8);
            if (tl && M <= DIRECT_M) { /* AVX2: both 8-row halves of a group where this thread has them */
                const int halves = NRP == 8 && half == 0 && tile + 1 < t1 ? 2 : 1;
                for (int64_t i = m0; i < m1; i += 2)
                    FN(run_tdirect)(type, (int)(m1 - i < 2 ? m1 - i : 2), halves, x + i * nb, nb, tw, half,
                                    out + i * ldo + n, ldo, nr);
                tile += halves;
                continue;
            }
            if (M <= DIRECT_M) {
                for (int64_t i = m0; i < m1; i += 2)
                    FN(run_direct)(type, (int)(m1 - i < 2 ? m1 - i : 2), x + i * nb, nb, rp, idx, ldw, out + i * ldo + n, ldo, nr);
                tile += step;
                continue;
            }
            for (int64_t kb = 0; kb < nb; kb += KC) {
                const int kc = (int)(nb - kb < KC ? nb - kb : KC);
                /* prefetch the next panels' weights: these tiles' next K chunk, else the next tiles' first */
                if (tl) {
                    FN(tprefetch)(type, tw, kb + kc, nb);
                } else if (kb + kc < nb) {
                    FN(prefetch_panel)(rp[0], off, nr, kb + kc, nb, tb, sup);
                    if (two) FN(prefetch_panel)(rp2[0], off2, nr2, kb + kc, nb, tb, sup);
                } else {
                    for (int64_t next = tile + step; next < t1 && next < tile + 2 * step; next++) {
                        const uint8_t *nrp[NRP];
                        int32_t noff[NRP];
                        const int nnr = FN(tile_rows)(w, N, ldw, next * NRP, nrp, noff);
                        FN(prefetch_panel)(nrp[0], noff, nnr, 0, nb, tb, sup);
                    }
                }
                if (tl) FN(tunpack)(type, tw, nb, half, kb, kc, panel);
                else FN(unpack)(type, rp, idx, kb, kc, panel);
#if !VNNI
                if (two) {
                    if (tl) /* the pair's second tile: the next 8 rows */
                        FN(tunpack)(type, w + ((n + NRP) >> 4) * 16 * ldw, nb, (int)(((n + NRP) >> 3) & 1), kb, kc,
                                    panel2);
                    else FN(unpack)(type, rp2, idx2, kb, kc, panel2);
                    const int nrs[2] = {nr, nr2};
                    for (int64_t i = m0; i < m1; i += 4) {
                        const int mr = (int)(m1 - i < 4 ? m1 - i : 4);
                        float *ab[2] = {abuf + (i - m0) * NRP, abuf2 + (i - m0) * NRP};
                        float *mb[2] = {mbuf + (i - m0) * NRP, mbuf2 + (i - m0) * NRP};
                        float *o[2] = {out + i * ldo + n, out + i * ldo + n + NRP};
                        FN(run_kern2)(type, mr, x + i * nb + kb, nb, kc, panel, panel2, ab, mb, kb == 0,
                                      kb + kc == nb, o, ldo, nrs);
                    }
                    continue;
                }
#endif
                for (int64_t i = m0; i < m1; i += MR) {
                    const int mr = (int)(m1 - i < MR ? m1 - i : MR);
                    FN(run_kern)(type, mr, x + i * nb + kb, nb, kc, panel, abuf + (i - m0) * NRP, mbuf + (i - m0) * NRP,
                                 kb == 0, kb + kc == nb, out + i * ldo + n, ldo, nr);
                }
            }
            tile += step;
        }
    }
    return failed;
}

/* Returns 0, or -2 where a thread's panel could not be allocated: its tiles are then unwritten. */
static int FN(matmul)(int type, const xblock *x, int64_t M, int64_t nb, const uint8_t *w, int64_t N,
                      int64_t ldw, float *out, int64_t ldo, int nthreads) {
    const int tl = (type & TILED) != 0;
    type &= ~TILED;
    /* M chunk: activation rows whose blocks (mc * nb * 64 bytes, read by every thread) stay cached
     * while every tile passes over them; each chunk streams the weights once more (chunk_bytes) */
    int64_t mc = chunk_rows(VNNI, nb, MR);
    if (mc > M) mc = M;
    /* AVX2, Q4 types: two tiles per pass (kern2), each activation broadcast feeding both */
    const int pair = !VNNI && M > DIRECT_M && (type == T_Q4_0 || type == T_Q4_1 || type == T_Q4_K);
    /* AMX for the 16-row groups of a prefill (kern_amx), where mlm_set_isa enabled it */
    int amx = TILES && use_amx && M >= 16 && M > DIRECT_M && type != T_Q6_K;
    uint8_t *xa = NULL; /* the 16-row groups' activations packed for the tiles (amx_pack) */
#if TILES
    if (amx) {
        mc = (mc + 15) / 16 * 16; /* chunks of whole groups (the last one padded) */
        xa = grown(&FN(xabuf), &FN(xabuf_size), (size_t)((M + 15) / 16) * (size_t)nb * AMX_XB);
        amx = xa != NULL;
    }
#endif
    (void)xa;
    (void)amx;
    int failed = 0;
    if (nthreads <= 1) {
        failed = FN(matmul_share)(type, tl, x, M, nb, w, N, ldw, out, ldo, mc, pair, amx, xa, 0, 1);
    } else {
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
        failed |= FN(matmul_share)(type, tl, x, M, nb, w, N, ldw, out, ldo, mc, pair, amx, xa, omp_get_thread_num(),
                                   omp_get_num_threads());
    }
    return failed ? -2 : 0;
}

/* one row of nb blocks */
static __attribute__((unused)) void FN(quantize_row)(const float *x, int64_t nb, xblock *out) {
    for (int64_t b = 0; b < nb; b++) {
        const float *src = x + 32 * b;
        xblock *dst = out + b;
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
        /* int32 -> int8 codes in order; the sums of the first and of all 16 int32 codes */
        __m256i p01 = _mm256_packs_epi32(q[0], q[1]), p23 = _mm256_packs_epi32(q[2], q[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)dst->q, p);
        const __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        const __m256i sl = _mm256_add_epi32(q[0], q[1]);
        __m128i a = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        __m128i c = _mm_add_epi32(_mm256_castsi256_si128(sl), _mm256_extracti128_si256(sl, 1));
        a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0x4e));
        c = _mm_add_epi32(c, _mm_shuffle_epi32(c, 0x4e));
        a = _mm_add_epi32(a, _mm_shuffle_epi32(a, 0xb1));
        c = _mm_add_epi32(c, _mm_shuffle_epi32(c, 0xb1));
        dst->sx = _mm_cvtsi128_si32(a);
        dst->sxl = _mm_cvtsi128_si32(c);
        dst->ds = d * (float)dst->sx;
    }
}

/* Not one OpenMP region for a decode step's row: even a region of one thread costs 0.4-0.9 us
 * (FN(matmul_share)). */
static __attribute__((unused)) void FN(quantize)(const float *x, int64_t M, int64_t K, int64_t ldx, xblock *out, int nthreads) {
    const int64_t nb = K / 32;
    if (nthreads > 1 && M * K >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) FN(quantize_row)(x + m * ldx, nb, out + m * nb);
    } else {
        for (int64_t m = 0; m < M; m++) FN(quantize_row)(x + m * ldx, nb, out + m * nb);
    }
}

#undef V_ADD
#undef V_ADDI
#undef V_AND
#undef V_CVT
#undef V_FMA
#undef V_GATHER
#undef V_H16HI
#undef V_H16LO
#undef V_LOADF
#undef V_LOADI
#undef V_MUL
#undef V_MULLO
#undef V_NEG
#undef V_OR
#undef V_SET1B
#undef V_SET1F
#undef V_SET1I
#undef V_SLLI16
#undef V_SLLI32
#undef V_SRAI32
#undef V_SRL16
#undef V_SRLI16
#undef V_SRLI32
#undef V_STOREF
#undef V_STOREI
#undef V_UNHI32
#undef V_UNHI64
#undef V_UNLO32
#undef V_UNLO64
#undef V_XOR
#undef V_ZEROF
#undef V_ZEROI
#undef vi_t
#undef vf_t
#undef VB
#undef PB
#undef KC
#undef AI
#undef FN
#undef CAT
#undef CAT_
