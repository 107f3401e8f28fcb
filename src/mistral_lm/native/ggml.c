/* Linear layers computed directly on llama.cpp's GGUF quantized blocks (see ggml.py for the
 * numerics). Activations are quantized per 32 values to int8 codes with one float scale, weight
 * blocks are multiplied with them in exact integer arithmetic, and the float scaling happens once
 * per 32-block.
 *
 * Three paths, chosen at run time and capped by mlm_set_isa: AVX-512 VNNI (16-row weight panels,
 * vpdpbusd on 512-bit vectors, one lane per weight row), AVX2 (8-row panels, vpmaddubsw +
 * vpmaddwd) and portable C. All three compute the same exact int32 block dot products and then the
 * same float operations in the same order, so they agree bit for bit (the tests check it). */

#pragma GCC diagnostic ignored "-Wpsabi"

#include "float_common.h"
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum { T_Q4_0 = 2, T_Q4_1 = 3, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };

/* A flag on the type: the weights are in the tiled layout of ggml_tile.h (Q4_0, Q4_1, Q8_0, Q6_K
 * with N % 16 == 0; ggml.py `tile`), not in the file's rows. The same bytes in all, the same
 * results. */
#define TILED 0x100
#define TILEABLE(type) ((type) == T_Q4_0 || (type) == T_Q4_1 || (type) == T_Q8_0 || (type) == T_Q6_K)
/* A Q6_K superblock of a 16-row group, tiled: its first 208 bytes (ql, qh, the 16 int8 scales) as
 * 52 vectors, each one 4-byte column of the 16 rows (column v: bytes 4v..4v+3 of each row, row r
 * at byte 4r of the vector), placed by t6pos, then the 16 rows' float16 d. One stream,
 * superblock after superblock. */
#define T6_SB (16 * 210)
#define T6_D (52 * 64)
/* Where column v (ql 0-31, qh 32-47, scales 48-51) lies in a tiled superblock, in vectors: in the
 * order a decode first reads them, so that its loads run through the superblock from its start:
 * the scales, then per half h the ql columns of its even blocks paired with the qh columns, then
 * the ql columns of its odd blocks. */
static inline int t6pos(int v) {
    if (v >= 48) return v - 48;
    if (v >= 32) return 4 + 24 * ((v - 32) >> 3) + 2 * ((v - 32) & 7) + 1;
    return 4 + 24 * (v >> 4) + ((v & 15) < 8 ? 2 * (v & 15) : 16 + (v & 7));
}
/* Per block of the other tileable types: its code bytes, and the bytes before them (the float16
 * scale, and for Q4_1 the min). */
#define TCB(type) ((type) == T_Q8_0 ? 32 : 16)
#define THEAD(type) ((type) == T_Q4_1 ? 4 : 2)

/* One quantized activation block: 32 int8 codes, the sum of all 32 codes and of the first 16
 * (the offset corrections: Q6_K has two 16-element scales), the scale d and ds = fl(d * sx) (the
 * min term's factor); 64 bytes, one cache line. */
typedef struct {
    int8_t q[32];
    int32_t sx;
    int32_t sxl;
    float d;
    float ds;
    uint8_t pad[16];
} xblock;

_Static_assert(sizeof(xblock) == 64, "activation block is one cache line");

static int type_bytes(int type) {
    switch (type) {
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q6_K: return 210;
    default: return 0;
    }
}

static int type_block(int type) { return type == T_Q4_K || type == T_Q6_K ? 256 : 32; }

/* log2 of the weight code offset (u - off with off = 1 << shift), -1 for none. */
static inline int off_shift(int type) { return type == T_Q4_0 ? 3 : type == T_Q8_0 ? 7 : type == T_Q6_K ? 5 : -1; }

/* Q4_K's 6-bit scale and min of 32-sub-block j from the 12 packed bytes. */
static inline void q4k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* ------------------------------------------------------------------ scalar */

static float f16_scalar(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    float f;
    if (exp == 0) {
        f = (float)man * (1.0f / 16777216.0f); /* zero or subnormal: exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return f;
}

/* Weight 32-block b of one row as unsigned codes u, the integer scales of its two 16-element
 * halves (Q6_K; else 1), cw and mw. */
__attribute__((always_inline)) static inline void decode_scalar(int type, const uint8_t *row, int64_t b, int u[32],
                                                                int sc[2], float *cw, float *mw) {
    *mw = 0.0f;
    sc[0] = sc[1] = 1;
    if (type == T_Q4_0 || type == T_Q4_1) {
        const uint8_t *blk = row + b * (type == T_Q4_0 ? 18 : 20), *q = blk + (type == T_Q4_0 ? 2 : 4);
        for (int j = 0; j < 16; j++) {
            u[j] = q[j] & 15;
            u[j + 16] = q[j] >> 4;
        }
        *cw = f16_scalar(blk);
        if (type == T_Q4_1) *mw = f16_scalar(blk + 2);
    } else if (type == T_Q8_0) {
        const uint8_t *blk = row + b * 34;
        for (int j = 0; j < 32; j++) u[j] = blk[2 + j] ^ 0x80;
        *cw = f16_scalar(blk);
    } else if (type == T_Q4_K) {
        const uint8_t *blk = row + (b >> 3) * 144, *q = blk + 16 + 32 * ((b & 7) >> 1);
        const int j = (int)(b & 7);
        for (int e = 0; e < 32; e++) u[e] = (j & 1) ? q[e] >> 4 : q[e] & 15;
        int s, mn;
        q4k_scale_min(blk + 4, j, &s, &mn);
        *cw = f16_scalar(blk) * (float)s;
        *mw = -(f16_scalar(blk + 2) * (float)mn);
    } else { /* T_Q6_K */
        const uint8_t *blk = row + (b >> 3) * 210;
        const int j = (int)(b & 7), h = j >> 2, t = j & 3;
        const uint8_t *ql = blk + 64 * h + 32 * (t & 1), *qh = blk + 128 + 32 * h;
        for (int e = 0; e < 32; e++) u[e] = ((t & 2) ? ql[e] >> 4 : ql[e] & 15) | (((qh[e] >> (2 * t)) & 3) << 4);
        sc[0] = (int8_t)blk[192 + 2 * j];
        sc[1] = (int8_t)blk[193 + 2 * j];
        *cw = f16_scalar(blk + 208);
    }
}

/* Block b of row n, from the file's rows or from the tiled layout (gathered into one block). */
__attribute__((always_inline)) static inline void decode_row_block(int type, const uint8_t *w, int64_t ldw, int64_t n,
                                                                   int64_t nb, int64_t b, int u[32], int sc[2],
                                                                   float *cw, float *mw) {
    if (!(type & TILED)) {
        decode_scalar(type, w + n * ldw, b, u, sc, cw, mw);
        return;
    }
    type &= ~TILED;
    if (type == T_Q6_K) { /* the row's superblock gathered from its group's columns */
        const uint8_t *sp = w + (n >> 4) * 16 * ldw + (b >> 3) * T6_SB;
        const int r = (int)(n & 15);
        uint8_t blk[210];
        for (int v = 0; v < 52; v++) memcpy(blk + 4 * v, sp + 64 * t6pos(v) + 4 * r, 4);
        memcpy(blk + 208, sp + T6_D + 2 * r, 2);
        decode_scalar(type, blk, b & 7, u, sc, cw, mw);
        return;
    }
    const int cb = TCB(type), head = THEAD(type), r = (int)(n & 15);
    const uint8_t *g = w + (n >> 4) * 16 * ldw, *codes = g + b * 16 * cb + 4 * r, *scales = g + nb * 16 * cb + b * 32 + 2 * r;
    uint8_t blk[210]; /* a Q4_0, Q4_1 or Q8_0 block gathered (sized for any type, as decode_scalar is inlined) */
    memcpy(blk, scales, 2);
    if (type == T_Q4_1) memcpy(blk + 2, scales + nb * 32, 2);
    for (int v = 0; v < cb / 4; v++) memcpy(blk + head + 4 * v, codes + 64 * v, 4);
    decode_scalar(type, blk, 0, u, sc, cw, mw);
}

/* The most bytes one scratch allocation of the matmuls may take (0: no limit). Only the tests set
 * it (mlm_ggml_scratch_limit), so that a failed allocation, which leaves output rows unwritten, can
 * be seen to reach the caller as an error. */
static size_t scratch_limit = 0;

static void *scratch_malloc(size_t bytes) {
    return scratch_limit && bytes > scratch_limit ? NULL : malloc(bytes);
}

/* Returns 0, or -2 where a thread's scratch could not be had (its rows are then unwritten). */
static int matmul_scalar(int type, const xblock *x, int64_t M, int64_t nb, const uint8_t *w, int64_t N,
                         int64_t ldw, float *out, int64_t ldo, int nthreads) {
    const int full = type;
    type &= ~TILED;
    const int has_min = type == T_Q4_1 || type == T_Q4_K, sh = off_shift(type);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(| : failed)
    {
        float *acc = scratch_malloc(sizeof(float) * (size_t)M), *accm = scratch_malloc(sizeof(float) * (size_t)M);
        const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        failed |= (!acc || !accm) && N * t / nt < N * (t + 1) / nt;
        for (int64_t n = N * t / nt; acc && accm && n < N * (t + 1) / nt; n++) {
            memset(acc, 0, sizeof(float) * (size_t)M);
            memset(accm, 0, sizeof(float) * (size_t)M);
            for (int64_t b = 0; b < nb; b++) {
                int u[32], sc[2];
                float cw, mw;
                decode_row_block(full, w, ldw, n, nb, b, u, sc, &cw, &mw);
                for (int64_t m = 0; m < M; m++) {
                    const xblock *xb = x + m * nb + b;
                    int32_t h[2] = {0, 0};
                    for (int e = 0; e < 32; e++) h[e >> 4] += u[e] * xb->q[e];
                    if (sh >= 0) {
                        h[0] -= xb->sxl << sh;
                        h[1] -= (xb->sx - xb->sxl) << sh;
                    }
                    const int32_t I = sc[0] * h[0] + sc[1] * h[1];
                    acc[m] = fmaf(cw * xb->d, (float)I, acc[m]);
                    if (has_min) accm[m] = fmaf(mw, xb->ds, accm[m]);
                }
            }
            for (int64_t m = 0; m < M; m++) out[m * ldo + n] = has_min ? acc[m] + accm[m] : acc[m];
        }
        free(acc);
        free(accm);
    }
    return failed ? -2 : 0;
}

/* one row of nb blocks */
static void quantize_row_scalar(const float *x, int64_t nb, xblock *out) {
    for (int64_t b = 0; b < nb; b++) {
        const float *src = x + 32 * b;
        xblock *dst = out + b;
        float amax = 0.0f;
        for (int e = 0; e < 32; e++) amax = fmaxf(amax, fabsf(src[e]));
        const float d = amax / 127.0f;
        memset(dst, 0, sizeof *dst);
        dst->d = d;
        if (d == 0.0f) continue;
        int sl = 0, sx = 0;
        for (int e = 0; e < 32; e++) {
            dst->q[e] = (int8_t)nearbyintf(src[e] / d);
            sx += dst->q[e];
            if (e == 15) sl = sx;
        }
        dst->sx = sx;
        dst->sxl = sl;
        dst->ds = d * (float)sx;
    }
}

/* As ggml_tile.h's quantize: rows it does not split run without an OpenMP region. */
static void quantize_scalar(const float *x, int64_t M, int64_t K, int64_t ldx, xblock *out, int nthreads) {
    const int64_t nb = K / 32;
    if (nthreads > 1 && M * K >= 65536) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row_scalar(x + m * ldx, nb, out + m * nb);
    } else {
        for (int64_t m = 0; m < M; m++) quantize_row_scalar(x + m * ldx, nb, out + m * nb);
    }
}

/* ------------------------------------------------------------------ SIMD instantiations */

/* How the tiles read a field of NRP rows at once (ggml_tile.h rows4): 1, NRP scalar loads; 0, a
 * gather. AMD's Zen cores microcode vpgatherdd, and there the loads decode Q4_0 ~8% faster
 * (bench/RESULTS.md); elsewhere the gather stays. Set with the ISA (mlm_set_isa). */
static int scalar_row_loads = 0;

/* Whether the AVX-512 prefill hands its 16-row groups to AMX tiles (kern_amx): set by
 * mlm_set_isa where the CPU has AMX-INT8, the OS grants the tile state and the cap allows it. */
static int use_amx = 0;

/* Weight tiles per pass of the AMX prefill (matmul_amx), 1..32: their panels stay in L2 while
 * each 16-row group runs over all of them (bench/RESULTS.md). */
static int amx_panels = 4;

/* Bytes of activation blocks in one M chunk of a prefill matmul (0: the default of the ISA). Every
 * chunk streams the weights once more, so a wide matrix read in chunks sized for L2 (512 KB: 16
 * rows of a 7B's down_proj, 448 blocks a row) was read 32 times at M = 512. The AVX-512 kernels
 * stay fed from L3, and 4 MB measured best of 1 to 8 MB at 1B and 7B shapes. The AVX2 kernels,
 * a broadcast load per 4 activation codes, took about 8% longer with 4 MB at a 1B's M = 512
 * (median of 8 alternated comparisons, 0.94-1.18): they keep 512 KB (bench/RESULTS.md). */
static int64_t chunk_bytes = 0;

/* *buf with room for `need` bytes (64-byte aligned, grown as needed; *size its room): a thread's
 * scratch kept across calls. NULL where it cannot be had. */
static uint8_t *grown(uint8_t **buf, size_t *size, size_t need) {
    if (scratch_limit && need > scratch_limit) return NULL;
    if (*size < need) {
        free(*buf);
        *buf = aligned_alloc(64, (need + 63) & ~(size_t)63);
        *size = *buf ? need : 0;
    }
    return *buf;
}

/* Activation rows per M chunk (a multiple of mr): chunk_bytes where set, else the ISA's default
 * bytes but at least 128 rows. Every chunk also unpacks each weight panel once more, and with
 * fewer rows to share it that shows: on AVX2 a 7B's down_proj (K = 14336) got 18 rows of 512 KB
 * and took 1.19x the time it takes with 4 MB at M = 512, while K = 2048 runs best at 512 KB
 * (bench/RESULTS.md). */
static int64_t chunk_rows(int vnni, int64_t nb, int mr) {
    const int64_t rows = (chunk_bytes > 0 ? chunk_bytes : vnni ? 4 << 20 : 512 << 10) / 64 / nb / mr * mr;
    const int64_t least = chunk_bytes > 0 ? 4 * mr : (128 + mr - 1) / mr * mr;
    return rows < least ? least : rows;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#define ISA avx512
#define VNNI 1
#define MR 4
#define NRP 16
#ifdef MLM_NO_AMX /* build.py's retry for an assembler that lacks the tile instructions */
#define TILES 0
#else
#define TILES 1
#endif
#include "ggml_tile.h"
#pragma GCC pop_options
#undef ISA
#undef VNNI
#undef MR
#undef NRP
#undef TILES

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ISA avx2
#define VNNI 0
#define MR 3
#define NRP 8
#define TILES 0
#include "ggml_tile.h"
#pragma GCC pop_options
#undef ISA
#undef VNNI
#undef MR
#undef NRP
#undef TILES

/* ------------------------------------------------------------------ exported API */

static int isa_level = -1;

static int cpu_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2"))
        return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1; /* f16c comes with them */
    return 0;
}

/* AMX-TILE and AMX-INT8 in CPUID, and Linux's permission for this process to use the tile
 * state (without it the first tile instruction faults): asked once. */
static int amx_ready(void) {
    static int ready = -1;
    if (ready < 0) {
        unsigned a, b, c, d;
        (void)a, (void)b, (void)c, (void)d;
        ready = 0;
#if defined(__linux__) && !defined(MLM_NO_AMX)
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1))
            ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
#endif
    }
    return ready;
}

/* cap: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX-512 and AMX (the widest the CPU has); returns the
 * vector level in use (0-2). */
int mlm_set_isa(int cap) {
    const int cpu = cpu_level();
    isa_level = cap < cpu ? (cap < 0 ? 0 : cap) : cpu;
    use_amx = cap >= 3 && isa_level == 2 && amx_ready();
    scalar_row_loads = __builtin_cpu_is("amd");
    return isa_level;
}

/* Whether the prefill uses AMX: 0 or 1 sets it (1 only where mlm_set_isa found it usable), -1
 * only asks; returns the old setting. The tests compare both. */
int mlm_ggml_amx(int mode) {
    if (isa_level < 0) mlm_set_isa(3);
    const int old = use_amx;
    if (mode >= 0) use_amx = mode && isa_level == 2 && amx_ready();
    return old;
}

/* Sets amx_panels (clamped to 1..32) where panels > 0; returns the old value. */
int mlm_ggml_amx_panels(int panels) {
    const int old = amx_panels;
    if (panels > 0) amx_panels = panels > 32 ? 32 : panels;
    return old;
}

/* The row-load mode (see scalar_row_loads): 0 or 1 sets it, -1 only asks; returns the old one.
 * Both read the same bytes; the tests compare them. */
int mlm_ggml_row_loads(int mode) {
    if (isa_level < 0) mlm_set_isa(3);
    const int old = scalar_row_loads;
    if (mode >= 0) scalar_row_loads = mode != 0;
    return old;
}

/* Sets the M chunk's size in bytes (see chunk_bytes; 0: each ISA's default) and returns the old
 * setting. Results do not depend on it; the tests shrink it to cross chunk boundaries. */
int64_t mlm_ggml_chunk_bytes(int64_t bytes) {
    const int64_t old = chunk_bytes;
    chunk_bytes = bytes > 0 ? bytes : 0;
    return old;
}

int mlm_ggml_xblock_bytes(void) { return (int)sizeof(xblock); }

/* x float32 (M, K) with row stride ldx -> out: M * K/32 blocks. K % 32 == 0. */
void mlm_ggml_quantize(const float *x, int64_t M, int64_t K, int64_t ldx, void *out, int nthreads) {
    if (isa_level < 0) mlm_set_isa(3);
    if (isa_level >= 1) quantize_avx2(x, M, K, ldx, out, nthreads);
    else quantize_scalar(x, M, K, ldx, out, nthreads);
}

/* Whether `type` (with TILED or not) can hold (N, K) weights; the base type in *base. */
static int valid(int type, int64_t N, int64_t K, int *base) {
    *base = type & ~TILED;
    if (type_bytes(*base) == 0 || K % type_block(*base) != 0 || (type & ~(TILED | 0xff))) return 0;
    if (type & TILED) return TILEABLE(*base) && N % 16 == 0;
    return 1;
}

/* out[m, n] (row stride ldo) = row m of the quantized activations . weight row n (row stride ldw
 * bytes). Returns 0, -1 for an unsupported type or a K the type's blocks do not divide, or -2 where
 * a thread's scratch could not be allocated (out is then incomplete). */
int mlm_ggml_matmul(int type, const void *xq, int64_t M, int64_t K, const uint8_t *w, int64_t N, int64_t ldw,
                    float *out, int64_t ldo, int nthreads) {
    int base;
    if (!valid(type, N, K, &base)) return -1;
    if ((type & TILED) && ldw != K / type_block(base) * type_bytes(base)) return -1;
    if (isa_level < 0) mlm_set_isa(3);
    if (M <= 0 || N <= 0) return 0;
    const int64_t nb = K / 32;
    if (isa_level == 2) return matmul_avx512(type, xq, M, nb, w, N, ldw, out, ldo, nthreads);
    if (isa_level == 1) return matmul_avx2(type, xq, M, nb, w, N, ldw, out, ldo, nthreads);
    return matmul_scalar(type, xq, M, nb, w, N, ldw, out, ldo, nthreads);
}

/* The file's rows (N, K/32 blocks each) -> the tiled layout (ggml_tile.h; ggml.py `tile` is its
 * torch definition) in dst, N a multiple of 16, for Q4_0, Q4_1, Q8_0 and Q6_K. A 16-row group is
 * read and written within its own 16 rows' bytes, so groups run on any thread. Returns 0, or -1. */
int mlm_ggml_tile(int type, const uint8_t *src, int64_t N, int64_t K, uint8_t *dst, int nthreads) {
    if (N % 16 || K % type_block(type) || !TILEABLE(type)) return -1;
    const int64_t nb = K / 32, tb = type_bytes(type), ldw = K / type_block(type) * tb;
    if (type == T_Q6_K) { /* a scalar copy: Q6_K is a fifth of a Q4_K_M file's bytes */
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
        for (int64_t g = 0; g < N / 16; g++) {
            for (int r = 0; r < 16; r++) {
                const uint8_t *row = src + (g * 16 + r) * ldw;
                for (int64_t s = 0; s < nb / 8; s++) {
                    uint8_t *sp = dst + g * 16 * ldw + s * T6_SB;
                    for (int v = 0; v < 52; v++) memcpy(sp + 64 * t6pos(v) + 4 * r, row + s * 210 + 4 * v, 4);
                    memcpy(sp + T6_D + 2 * r, row + s * 210 + 208, 2);
                }
            }
        }
        return 0;
    }
    const int cb = TCB(type), head = THEAD(type);
    if (isa_level < 0) mlm_set_isa(3);
    if (isa_level == 2) {
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
        {
            const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num(), groups = N / 16;
            tile_groups_avx512(type, src, nb, groups * t / nt, groups * (t + 1) / nt, dst);
        }
        return 0;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int64_t g = 0; g < N / 16; g++) {
        uint8_t *codes = dst + g * 16 * ldw, *d = codes + nb * 16 * cb, *m = d + nb * 32;
        for (int r = 0; r < 16; r++) {
            const uint8_t *row = src + (g * 16 + r) * ldw;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * tb;
                memcpy(d + b * 32 + 2 * r, blk, 2);
                if (type == T_Q4_1) memcpy(m + b * 32 + 2 * r, blk + 2, 2);
                for (int v = 0; v < cb / 4; v++) memcpy(codes + b * 16 * cb + 64 * v + 4 * r, blk + head + 4 * v, 4);
            }
        }
    }
    return 0;
}

/* Sets the scratch limit in bytes (see scratch_limit; 0: none) and returns the old one. */
int64_t mlm_ggml_scratch_limit(int64_t bytes) {
    const int64_t old = (int64_t)scratch_limit;
    scratch_limit = bytes > 0 ? (size_t)bytes : 0;
    return old;
}

/* quantize + matmul in one call (one ctypes crossing per Linear); xq: M * K/32 blocks of scratch. */
int mlm_ggml_linear(int type, const float *x, int64_t M, int64_t K, int64_t ldx, void *xq, const uint8_t *w,
                    int64_t N, int64_t ldw, float *out, int64_t ldo, int nthreads) {
    int base;
    if (!valid(type, N, K, &base)) return -1;
    mlm_ggml_quantize(x, M, K, ldx, xq, nthreads);
    return mlm_ggml_matmul(type, xq, M, K, w, N, ldw, out, ldo, nthreads);
}

/* Rows of weight blocks as float32 (N, K): w = (cw * scale) * (u - offset) (+ mw for the types
 * with a min), rounded once, which is the torch definition (ggml.py `reference_dequantize`, in
 * double) bit for bit, and gguf's decoder too, down to the sign of a zero: a zero code under a
 * negative scale stays -0 (adding a zero min, or multiplying the integers first, would make it +0).
 * Computed in float, the products are exact (a float16 d times an 8-bit scale times a 6-bit code
 * needs at most 23 bits; Q4_K's d * scale is an exact float of at most 17 bits, times 4-bit codes)
 * and so is the double sum with the min (every bit lies between 2^-24 and 2^26), so the float sum
 * rounds the same exact value once: the same bits, in vectors the compiler makes. Row i is stored
 * row rows[i] (rows NULL: row i). For the embedding's lookups, a row at a time. out_type DT_F32
 * stores them as float32; DT_BF16 and DT_F16 round those values once more, to bfloat16 or float16
 * at nearest even as torch's copy_ does (a loader decoding into its dtype, without a float32 copy
 * of the matrix to convert). */
__attribute__((always_inline)) static inline void dequantize_row(int type, const uint8_t *w, int64_t ldw, int64_t n,
                                                                 int64_t K, void *out, int64_t at, int out_type) {
    const int base = type & ~TILED, sh = off_shift(base), has_min = base == T_Q4_1 || base == T_Q4_K;
    const float off = sh < 0 ? 0.0f : (float)(1 << sh);
    for (int64_t b = 0; b < K / 32; b++, at += 32) {
        int u[32], sc[2];
        float cw, mw, f[32];
        decode_row_block(type, w, ldw, n, K / 32, b, u, sc, &cw, &mw);
        const float s0 = cw * (float)sc[0], s1 = cw * (float)sc[1]; /* exact */
        if (has_min)
            for (int e = 0; e < 32; e++) f[e] = (e < 16 ? s0 : s1) * ((float)u[e] - off) + mw;
        else
            for (int e = 0; e < 32; e++) f[e] = (e < 16 ? s0 : s1) * ((float)u[e] - off);
        if (out_type == DT_F32) memcpy((float *)out + at, f, sizeof f);
        else if (out_type == DT_BF16)
            for (int e = 0; e < 32; e++) ((uint16_t *)out)[at + e] = f32_to_bf16(f[e]);
        else
            for (int e = 0; e < 32; e++) ((uint16_t *)out)[at + e] = f32_to_f16(f[e]);
    }
}

/* One per instruction set, each with its own parallel loop: an OpenMP region in the shared inline
 * body would be outlined once, for the baseline ISA. Whole matrices (a load decoding a checkpoint)
 * on torch's threads; an embedding's few rows on one. */
#define DEQUANTIZE_ROWS(name, attrs)                                                                          \
    attrs static void name(int type, const uint8_t *w, int64_t ldw, const int64_t *rows, int64_t N, int64_t K, \
                           void *out, int out_type) {                                                         \
        _Pragma("omp parallel for if (N * K >= (1 << 18)) schedule(static)")                                  \
        for (int64_t i = 0; i < N; i++)                                                                       \
            dequantize_row(type, w, ldw, rows ? rows[i] : i, K, out, i * K, out_type);                        \
    }
DEQUANTIZE_ROWS(dequantize_rows_avx512, T512)
DEQUANTIZE_ROWS(dequantize_rows_avx2, T256)
DEQUANTIZE_ROWS(dequantize_rows_plain, )

int mlm_ggml_dequantize(int type, const uint8_t *w, int64_t ldw, const int64_t *rows, int64_t N, int64_t K,
                        void *out, int out_type) {
    int base;
    if (!valid(type, 16, K, &base) || out_type < DT_F32 || out_type > DT_F16) return -1;
    if (isa_level < 0) mlm_set_isa(3);
    if (isa_level == 2) dequantize_rows_avx512(type, w, ldw, rows, N, K, out, out_type);
    else if (isa_level == 1) dequantize_rows_avx2(type, w, ldw, rows, N, K, out, out_type);
    else dequantize_rows_plain(type, w, ldw, rows, N, K, out, out_type);
    return 0;
}
