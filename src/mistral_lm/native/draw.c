/* torch.multinomial(probs, 1, generator=g) for float32 rows on the CPU, drawing the same tokens
 * and leaving g in the same state, without torch's cost.
 *
 * torch draws one sample per row as argmax(p / q) with q ~ Exp(1) for every entry: q is
 * float(-log1p(-u)), u the low 53 bits of a 64-bit word made of two of the generator's MT19937
 * words (the first the high half), times 2^-53; the rows are drawn in order. Computing that
 * exponential for a 49k vocabulary costs torch ~1.5 ms a token. Here the generator's words are
 * still all produced (the state must advance exactly as torch's), but an entry of probability 0
 * can only win through a NaN (q = 0, u = 0), so its words are merely checked; log1p runs only
 * for entries that can win (the top-k or top-p survivors of a processed row).
 *
 * The generator's state is torch's `Generator.get_state()` bytes (CPUGeneratorImplState): the
 * legacy pod's seed (8 bytes), `left` (int32 at 8), `seeded` (int32 at 12), `next` (uint64 at
 * 16) and the 624 state words as uint64 (at 24). draw.py checks this layout against torch
 * itself at first use. */
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define MT_N 624
#define MT_M 397

typedef struct {
    uint32_t s[MT_N];
    int64_t left, next;
} Engine;

static inline uint32_t twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

/* the compiler's widest vectors where the CPU has them: integer words, the same on every ISA */
__attribute__((target_clones("avx512f", "avx2", "default"))) static void next_state(Engine *e) {
    uint32_t *s = e->s;
    e->left = MT_N;
    e->next = 0;
    for (int i = 0; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ twist(s[i], s[i + 1]);
    for (int i = MT_N - MT_M; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ twist(s[MT_N - 1], s[0]);
}

/* the next n raw (untempered) words into w, as n steps of torch's engine produce them: a step
 * that takes `left` to 0 refills the state first */
static void raw_words(Engine *e, uint32_t *w, int64_t n) {
    while (n > 0) {
        if (e->left == 1) {
            next_state(e);
            e->left = MT_N + 1; /* the refilling step's own decrement follows */
        }
        int64_t take = e->left - 1;
        if (take > n) take = n;
        memcpy(w, e->s + e->next, sizeof(uint32_t) * (size_t)take);
        e->left -= take;
        e->next += take;
        w += take;
        n -= take;
    }
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* u in [0, 1) for the entry whose words are hi, lo (raw): torch's uniform double */
static inline double uniform(uint32_t hi, uint32_t lo) {
    const uint64_t r = ((uint64_t)temper(hi) << 32) | temper(lo);
    return (double)(r & ((1ull << 53) - 1)) * (1.0 / 9007199254740992.0);
}

/* p / q for q = float(-log1p(-u)): torch's exponential_ of a float tensor, then its division */
static inline float ratio_of(float x, double u) { return x / (float)(-1.0 * log1p(-u)); }

/* argmax over one row of p / q (the first NaN, else the first maximum, as torch's argmax), q
 * from the row's 2V raw words; 0, or 1 where torch refuses the row (an entry NaN, infinite or
 * negative; no entry above zero). Every entry is checked, as torch checks before drawing. */
static int scan(const float *row, int64_t V, const uint32_t *words, int64_t *out) {
    float best = 0.0f;
    int64_t at = -1;
    int nan = 0, any = 0;
    for (int64_t i = 0; i < V; i++) {
        const float x = row[i];
        if (x == 0.0f) { /* x / q is a zero, never above the best, unless q = 0 (u = 0): 0 / 0 */
            const uint32_t lo = words[2 * i + 1];
            if (nan) continue;
            if (lo == 0 && (temper(words[2 * i]) & 0x1fffffu) == 0) {
                nan = 1;
                at = i;
            } else if (at < 0) {
                best = x;
                at = i;
            }
            continue;
        }
        if (!(x > 0.0f) || isinf(x)) return 1;
        any = 1;
        if (nan) continue;
        const double u = uniform(words[2 * i], words[2 * i + 1]);
        /* q >= u, so p / q <= p / u: an entry bounded below the best by more than the roundings
         * of q and of the division cannot win (and a tie goes to the first) */
        if (at >= 0 && (double)x * (1.0 + 0x1p-20) < (double)best * u) continue;
        const float ratio = ratio_of(x, u);
        if (ratio > best || at < 0) {
            best = ratio;
            at = i;
        }
    }
    if (!any) return 1;
    *out = at;
    return 0;
}

/* out[b] = torch.multinomial(p, 1, generator)[b, 0] for p (B, V) float32, row-major; `state` is
 * the generator's get_state() bytes, advanced in place as torch advances it. Returns 0; 1 where
 * torch would raise (an entry NaN, infinite or negative, a row of zeros: the caller lets torch
 * raise its own error) or the state is not one torch writes; nothing is changed then. */
int mlm_multinomial(const float *p, int64_t B, int64_t V, uint8_t *state, int64_t *out) {
    int32_t left32;
    uint64_t next64;
    memcpy(&left32, state + 8, 4);
    memcpy(&next64, state + 16, 8);
    if (B < 0 || V < 1 || left32 < 1 || left32 > MT_N || next64 > MT_N) return 1;
    Engine e;
    for (int i = 0; i < MT_N; i++) {
        uint64_t w;
        memcpy(&w, state + 24 + 8 * (size_t)i, 8);
        e.s[i] = (uint32_t)w;
    }
    e.left = left32;
    e.next = (int64_t)next64;
    if (e.left > 1 && e.next + e.left - 1 > MT_N) return 1; /* words past the state's end */
    uint32_t *words = malloc(sizeof(uint32_t) * 2 * (size_t)V);
    if (words == NULL) return 1;
    int rc = 0;
    for (int64_t b = 0; b < B && rc == 0; b++) {
        raw_words(&e, words, 2 * V);
        rc = scan(p + b * V, V, words, out + b);
    }
    free(words);
    if (rc) return 1; /* the caller's state is left as it was */
    const int32_t left_out = (int32_t)e.left;
    const uint64_t next_out = (uint64_t)e.next;
    memcpy(state + 8, &left_out, 4);
    memcpy(state + 16, &next_out, 8);
    for (int i = 0; i < MT_N; i++) {
        const uint64_t w = e.s[i];
        memcpy(state + 24 + 8 * (size_t)i, &w, 8);
    }
    return 0;
}
