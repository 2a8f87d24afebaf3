/*
 * The loops that dominate training time: random bits, rounding to a storage format,
 * decoding, and the optimizer step. This file is compiled twice: on its own as the
 * generic implementation (every CPU of the architecture; on aarch64 that includes
 * NEON), and through hot_avx2.c with AVX2 enabled. api.c chooses one at run time.
 * Builds use -ffp-contract=off, so both give bit-identical results.
 */
#include <math.h>
#include <string.h>

#include "hot.h"
#include "philox.h"

#ifndef SAGD_HOT_SUFFIX
#define SAGD_HOT_SUFFIX _generic
#endif
#define SAGD_CAT2(a, b) a##b
#define SAGD_CAT(a, b) SAGD_CAT2(a, b)
#define HOT(name) SAGD_CAT(sagd_hot_##name, SAGD_HOT_SUFFIX)

#if defined(_MSC_VER)
#define SAGD_RESTRICT __restrict
#else
#define SAGD_RESTRICT restrict
#endif

/* Elements per inner chunk: the random bits of one chunk live on the stack. */
#define CHUNK 256
/* Philox blocks computed side by side (structure of arrays, so the compiler vectorizes). */
#define LANES 16

static inline uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline int finite_f(float x) { return (f2u(x) & 0x7f800000u) != 0x7f800000u; }

/* ---------------------------------------------------------------- random bits */

#ifdef SAGD_HOT_AVX2
#include <immintrin.h>

/* Words hi and lo of the 32 x 32 -> 64 bit products m * x, for 8 lanes at once. */
static inline void mulhilo8(__m256i x, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(x, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

/* LANES consecutive Philox blocks, two groups of 8 lanes in flight. */
static void philox_lanes(uint32_t k0, uint32_t k1, uint32_t block, uint32_t c1, uint32_t c2,
                         uint32_t c3, uint32_t *SAGD_RESTRICT out)
{
    const __m256i m0 = _mm256_set1_epi32((int)SAGD_PHILOX_M0);
    const __m256i m1 = _mm256_set1_epi32((int)SAGD_PHILOX_M1);
    __m256i x0[2], x1[2], x2[2], x3[2];
    int g, r;
    for (g = 0; g < 2; g++) {
        x0[g] = _mm256_add_epi32(_mm256_set1_epi32((int)(block + 8u * (uint32_t)g)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        x1[g] = _mm256_set1_epi32((int)c1);
        x2[g] = _mm256_set1_epi32((int)c2);
        x3[g] = _mm256_set1_epi32((int)c3);
    }
    for (r = 0; r < SAGD_PHILOX_ROUNDS; r++) {
        const __m256i kk0 = _mm256_set1_epi32((int)k0), kk1 = _mm256_set1_epi32((int)k1);
        for (g = 0; g < 2; g++) {
            __m256i hi0, lo0, hi1, lo1;
            mulhilo8(x0[g], m0, &hi0, &lo0);
            mulhilo8(x2[g], m1, &hi1, &lo1);
            x0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[g]), kk0);
            x2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[g]), kk1);
            x1[g] = lo1;
            x3[g] = lo0;
        }
        k0 += SAGD_PHILOX_W0;
        k1 += SAGD_PHILOX_W1;
    }
    for (g = 0; g < 2; g++) {
        /* 4 words x 8 blocks -> block-major: a 4x4 transpose in each 128-bit half. */
        __m256i a = _mm256_unpacklo_epi32(x0[g], x1[g]), b = _mm256_unpackhi_epi32(x0[g], x1[g]);
        __m256i c = _mm256_unpacklo_epi32(x2[g], x3[g]), d = _mm256_unpackhi_epi32(x2[g], x3[g]);
        __m256i b0 = _mm256_unpacklo_epi64(a, c), b1 = _mm256_unpackhi_epi64(a, c);
        __m256i b2 = _mm256_unpacklo_epi64(b, d), b3 = _mm256_unpackhi_epi64(b, d);
        uint32_t *o = out + 32 * g;
        _mm256_storeu_si256((__m256i *)(o + 0), _mm256_permute2x128_si256(b0, b1, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 8), _mm256_permute2x128_si256(b2, b3, 0x20));
        _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(b0, b1, 0x31));
        _mm256_storeu_si256((__m256i *)(o + 24), _mm256_permute2x128_si256(b2, b3, 0x31));
    }
}
#else
static void philox_lanes(uint32_t k0, uint32_t k1, uint32_t block, uint32_t c1, uint32_t c2,
                         uint32_t c3, uint32_t *SAGD_RESTRICT out)
{
    uint32_t x0[LANES], x1[LANES], x2[LANES], x3[LANES];
    int j, r;
    for (j = 0; j < LANES; j++) {
        x0[j] = block + (uint32_t)j;
        x1[j] = c1;
        x2[j] = c2;
        x3[j] = c3;
    }
    for (r = 0; r < SAGD_PHILOX_ROUNDS; r++) {
        /* Unrolling the lanes would hide them from the vectorizer. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 1
#endif
        for (j = 0; j < LANES; j++) {
            uint64_t p0 = (uint64_t)SAGD_PHILOX_M0 * x0[j];
            uint64_t p1 = (uint64_t)SAGD_PHILOX_M1 * x2[j];
            uint32_t y0 = (uint32_t)(p1 >> 32) ^ x1[j] ^ k0;
            uint32_t y2 = (uint32_t)(p0 >> 32) ^ x3[j] ^ k1;
            x1[j] = (uint32_t)p1;
            x3[j] = (uint32_t)p0;
            x0[j] = y0;
            x2[j] = y2;
        }
        k0 += SAGD_PHILOX_W0;
        k1 += SAGD_PHILOX_W1;
    }
    for (j = 0; j < LANES; j++) {
        out[4 * j + 0] = x0[j];
        out[4 * j + 1] = x1[j];
        out[4 * j + 2] = x2[j];
        out[4 * j + 3] = x3[j];
    }
}
#endif

void HOT(random_words)(const sagd_rng *rng, uint64_t first_word, size_t n, uint32_t *out)
{
    const uint32_t k0 = (uint32_t)rng->seed, k1 = (uint32_t)(rng->seed >> 32);
    const uint32_t s = rng->stream, lo = (uint32_t)rng->step, hi = (uint32_t)(rng->step >> 32);
    uint64_t j = first_word;
    size_t done = 0;
    while (done < n) {
        if ((j & 3) == 0 && n - done >= 4 * LANES) {
            philox_lanes(k0, k1, (uint32_t)(j >> 2), s, lo, hi, out + done);
            j += 4 * LANES;
            done += 4 * LANES;
        } else {
            uint32_t c[4];
            size_t w;
            c[0] = (uint32_t)(j >> 2);
            c[1] = s;
            c[2] = lo;
            c[3] = hi;
            sagd_philox_block(c, k0, k1);
            for (w = (size_t)(j & 3); w < 4 && done < n; w++, j++, done++)
                out[done] = c[w];
        }
    }
}

/* 16 random bits for each element e0 .. e0 + n - 1 (n <= CHUNK). */
static const uint16_t *bits16(const sagd_rng *rng, uint64_t e0, size_t n,
                              uint32_t words[CHUNK / 2 + 1], uint16_t halves[CHUNK + 2])
{
    size_t off = (size_t)(e0 & 1), nw = (off + n + 1) / 2, t;
    HOT(random_words)(rng, e0 >> 1, nw, words);
    for (t = 0; t < nw; t++) {
        halves[2 * t] = (uint16_t)words[t];
        halves[2 * t + 1] = (uint16_t)(words[t] >> 16);
    }
    return halves + off;
}

/* ---------------------------------------------------------------- formats */

static inline uint16_t bf16_from(float x, uint32_t r16, int stochastic)
{
    const uint32_t b = f2u(x), sign = (b >> 16) & 0x8000u, mag = b & 0x7fffffffu;
    /* Stochastic: the low 16 bits f are exactly the fraction between the two neighbours,
       and the carry happens iff r16 < f, the rule of every format (up iff u < frac).
       Nearest: ties to even. Written without branches, so loops vectorize. */
    const uint32_t add = stochastic ? (r16 ^ 0xFFFFu) : 0x7fffu + ((mag >> 16) & 1u);
    uint32_t h = (mag + add) >> 16;
    h = (stochastic && h > 0x7f7fu) ? 0x7f7fu : h;
    h = mag > 0x7f800000u ? 0x7fc0u : (mag == 0x7f800000u ? 0x7f80u : h);
    return (uint16_t)(sign | h);
}

static inline float bf16_to(uint16_t h) { return u2f((uint32_t)h << 16); }

static inline uint16_t fp16_from(float x, uint32_t r, int stochastic)
{
    uint32_t b = f2u(x), sign = (b >> 16) & 0x8000u, mag = b & 0x7fffffffu;
    int32_t e = (int32_t)(mag >> 23);
    int32_t eff = e ? e : 1; /* fp32 subnormals share the exponent of the smallest normal */
    uint64_t sig = (mag & 0x7fffffu) | (e ? 0x800000u : 0u);
    /* Bits below the fp16 grid at this magnitude: 13 for fp16 normals, more below. */
    int32_t k = 13 + (eff < 113 ? 113 - eff : 0);
    int32_t kk = k < 63 ? k : 63;
    uint32_t base = (uint32_t)((eff > 113 ? eff : 113) - 113) << 10;
    uint32_t q = (uint32_t)(sig >> kk);
    uint64_t rem = sig & ((1ull << kk) - 1);
    uint32_t up, h;
    if (stochastic) {
        /* P(up) = rem / 2^k, exact while k <= 32 (|x| >= 2^-33), to 2^-32 below. */
        up = kk <= 32 ? (((uint64_t)r << kk) < (rem << 32)) : (r < (rem >> (kk - 32)));
    } else {
        uint64_t half = 1ull << (kk - 1);
        up = rem > half || (rem == half && (q & 1u));
    }
    h = base + q + up;
    h = stochastic ? (h > 0x7bffu ? 0x7bffu : h) : (h > 0x7c00u ? 0x7c00u : h);
    if (e == 0xff) { /* inf, or NaN keeping the top of its payload as numpy does */
        uint32_t payload = (mag & 0x7fffffu) >> 13;
        h = (mag & 0x7fffffu) ? 0x7c00u | payload | (payload == 0) : 0x7c00u;
    }
    return (uint16_t)(sign | h);
}

static inline float fp16_to(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    const uint32_t normal = e == 0x1f ? (0x7f800000u | (m << 13)) : (((e + 112u) << 23) | (m << 13));
    const uint32_t subnormal = f2u((float)m * 5.9604644775390625e-8f); /* m * 2^-24, exact */
    return u2f(sign | (e == 0 ? subnormal : normal));
}

static inline int8_t int8_from(float x, float scale, uint32_t r, int stochastic)
{
    /* Like the float formats: the magnitude moves away from zero iff u < its fraction.
       double keeps the fraction of |x| / scale exact to ~2^-46. */
    double t = fabs((double)x) / (double)scale, q;
    if (stochastic) {
        double f = floor(t);
        q = f + (((double)r * 0x1p-32) < t - f ? 1.0 : 0.0);
    } else {
        q = nearbyint(t);
    }
    q = q > 127.0 ? 127.0 : q;
    q = x < 0.0f ? -q : q;
    return finite_f(x) ? (int8_t)q : (int8_t)0;
}

int64_t HOT(encode)(int fmt, const float *SAGD_RESTRICT x, size_t n, void *SAGD_RESTRICT out,
                    float scale, const sagd_rng *rng, uint64_t first_elem)
{
    uint32_t words[CHUNK / 2 + 1];
    uint16_t halves[CHUNK + 2];
    int64_t bad = 0;
    size_t s, i;
    const int sr = rng != NULL;

    for (i = 0; i < n; i++)
        bad += !finite_f(x[i]);

    if (fmt == SAGD_FP32) {
        memcpy(out, x, n * sizeof(float));
        return bad;
    }
    for (s = 0; s < n; s += CHUNK) {
        size_t len = n - s < CHUNK ? n - s : CHUNK;
        const float *xs = x + s;
        if (fmt == SAGD_BF16) {
            uint16_t *o = (uint16_t *)out + s;
            if (sr) {
                const uint16_t *r = bits16(rng, first_elem + s, len, words, halves);
                for (i = 0; i < len; i++)
                    o[i] = bf16_from(xs[i], r[i], 1);
            } else {
                for (i = 0; i < len; i++)
                    o[i] = bf16_from(xs[i], 0, 0);
            }
        } else if (fmt == SAGD_FP16) {
            uint16_t *o = (uint16_t *)out + s;
            if (sr) {
                HOT(random_words)(rng, first_elem + s, len, words);
                for (i = 0; i < len; i++)
                    o[i] = fp16_from(xs[i], words[i], 1);
            } else {
                for (i = 0; i < len; i++)
                    o[i] = fp16_from(xs[i], 0, 0);
            }
        } else { /* SAGD_INT8 */
            int8_t *o = (int8_t *)out + s;
            if (sr) {
                HOT(random_words)(rng, first_elem + s, len, words);
                for (i = 0; i < len; i++)
                    o[i] = int8_from(xs[i], scale, words[i], 1);
            } else {
                for (i = 0; i < len; i++)
                    o[i] = int8_from(xs[i], scale, 0, 0);
            }
        }
    }
    return bad;
}

void HOT(decode)(int fmt, const void *SAGD_RESTRICT in, size_t n, float scale,
                 float *SAGD_RESTRICT out)
{
    size_t i;
    if (fmt == SAGD_FP32) {
        memcpy(out, in, n * sizeof(float));
    } else if (fmt == SAGD_BF16) {
        const uint16_t *h = (const uint16_t *)in;
        for (i = 0; i < n; i++)
            out[i] = bf16_to(h[i]);
    } else if (fmt == SAGD_FP16) {
        const uint16_t *h = (const uint16_t *)in;
        for (i = 0; i < n; i++)
            out[i] = fp16_to(h[i]);
    } else {
        const int8_t *q = (const int8_t *)in;
        for (i = 0; i < n; i++)
            out[i] = (float)q[i] * scale;
    }
}

/* ---------------------------------------------------------------- optimizer */

static inline float state_load(const void *p, int fmt, size_t i)
{
    return fmt == SAGD_FP32 ? ((const float *)p)[i] : bf16_to(((const uint16_t *)p)[i]);
}

/* Store x in slot i if ok, else leave the slot alone. The old value is read either way,
   so the choice is a blend and the loop vectorizes. */
static inline void state_store(void *p, int fmt, size_t i, float x, uint32_t r16, int sr, int ok)
{
    if (fmt == SAGD_FP32) {
        float *f = (float *)p, old = f[i];
        f[i] = ok ? x : old;
    } else {
        uint16_t *h = (uint16_t *)p, old = h[i];
        uint16_t nw = bf16_from(x, r16, sr);
        h[i] = ok ? nw : old;
    }
}

/*
 * One chunk of an optimizer step. state_fmt, sr, begin and apply are passed as
 * literal constants by the dispatcher below, so each combination is compiled into
 * its own branch-free loop.
 */
static inline int64_t adam_chunk(const sagd_optim *o, int begin, int apply, size_t n,
                                 const float *SAGD_RESTRICT w, float *SAGD_RESTRICT g,
                                 void *SAGD_RESTRICT m, void *SAGD_RESTRICT v, int sfmt, int sr,
                                 const uint16_t *rm, const uint16_t *rv)
{
    const float b1 = o->beta1, b2 = o->beta2, a1 = 1.0f - o->beta1, a2 = (1.0f - o->beta2) * o->vscale;
    const float keep1 = begin ? b1 : 1.0f, keep2 = begin ? b2 : 1.0f, l2 = begin ? o->l2 : 0.0f;
    const float lr = o->lr, decay = o->decay, bc1 = o->bc1, bc2 = o->bc2, eps = o->eps;
    int64_t bad = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        float wi = w[i], gi = g[i] + l2 * wi;
        float mn = keep1 * state_load(m, sfmt, i) + a1 * gi;
        float vn = keep2 * state_load(v, sfmt, i) + a2 * (gi * gi);
        float wn = wi - lr * ((mn * bc1) / (sqrtf(vn * bc2) + eps) + decay * wi);
        int ok = finite_f(mn) & finite_f(vn) & (apply ? finite_f(wn) : 1);
        state_store(m, sfmt, i, mn, sr ? rm[i] : 0, sr, ok);
        state_store(v, sfmt, i, vn, sr ? rv[i] : 0, sr, ok);
        if (apply)
            g[i] = ok ? wn : wi;
        bad += !ok;
    }
    return bad;
}

static inline int64_t sgd_chunk(const sagd_optim *o, int begin, int apply, size_t n,
                                const float *SAGD_RESTRICT w, float *SAGD_RESTRICT g,
                                void *SAGD_RESTRICT m, int sfmt, int sr, const uint16_t *rm)
{
    /* Weight decay enters once per step: with the first micro-batch. */
    const float mu = o->momentum, lr = o->lr, l2 = begin ? o->l2 : 0.0f;
    const float decay = begin || m != NULL ? o->decay : 0.0f;
    const float keep = begin ? mu : 1.0f, gs = o->gscale;
    const int nesterov = o->nesterov;
    int64_t bad = 0;
    size_t i;
    if (m == NULL) { /* plain SGD: every pass applies its share */
        for (i = 0; i < n; i++) {
            float wi = w[i], wn = wi - lr * (g[i] + l2 * wi + decay * wi);
            int ok = finite_f(wn);
            g[i] = ok ? wn : wi;  /* wi was read: a blend, not a branch */
            bad += !ok;
        }
        return bad;
    }
    for (i = 0; i < n; i++) {
        float wi = w[i], gi = g[i] + l2 * wi;
        float mn = keep * state_load(m, sfmt, i) + gi;
        float step = nesterov ? gs * gi + mu * mn : mn;
        float wn = wi - lr * (step + decay * wi);
        int ok = finite_f(mn) & (apply ? finite_f(wn) : 1);
        state_store(m, sfmt, i, mn, sr ? rm[i] : 0, sr, ok);
        if (apply)
            g[i] = ok ? wn : wi;
        bad += !ok;
    }
    return bad;
}

#define ADAM_CASE(B, A, F, S)                                                              \
    bad += adam_chunk(o, B, A, len, w + s, g + s, (char *)m + s * esz, (char *)v + s * esz, \
                      F, S, rm, rv)
#define SGD_CASE(B, A, F, S)                                                              \
    bad += sgd_chunk(o, B, A, len, w + s, g + s, m ? (char *)m + s * esz : NULL, F, S, rm)

int64_t HOT(optim_step)(const sagd_optim *o, int phase, size_t n, const float *w, float *g,
                        void *m, void *v, int sfmt, const sagd_rng *rng_m,
                        const sagd_rng *rng_v, uint64_t first_elem)
{
    uint32_t words[CHUNK / 2 + 1];
    uint16_t hm[CHUNK + 2], hv[CHUNK + 2];
    const int begin = (phase & SAGD_BEGIN) != 0, apply = (phase & SAGD_APPLY) != 0;
    const int sr = sfmt == SAGD_BF16 && rng_m != NULL;
    const size_t esz = sfmt == SAGD_FP32 ? 4 : 2;
    int64_t bad = 0;
    size_t s;
    for (s = 0; s < n; s += CHUNK) {
        size_t len = n - s < CHUNK ? n - s : CHUNK;
        const uint16_t *rm = NULL, *rv = NULL;
        if (sr && m != NULL)
            rm = bits16(rng_m, first_elem + s, len, words, hm);
        if (sr && v != NULL && o->kind == SAGD_ADAM)
            rv = bits16(rng_v, first_elem + s, len, words, hv);
        if (o->kind == SAGD_ADAM) {
            /* Spelled out so that every loop is specialised on constants. */
            if (sfmt == SAGD_FP32) {
                if (begin && apply) ADAM_CASE(1, 1, SAGD_FP32, 0);
                else if (begin) ADAM_CASE(1, 0, SAGD_FP32, 0);
                else if (apply) ADAM_CASE(0, 1, SAGD_FP32, 0);
                else ADAM_CASE(0, 0, SAGD_FP32, 0);
            } else if (sr) {
                if (begin && apply) ADAM_CASE(1, 1, SAGD_BF16, 1);
                else if (begin) ADAM_CASE(1, 0, SAGD_BF16, 1);
                else if (apply) ADAM_CASE(0, 1, SAGD_BF16, 1);
                else ADAM_CASE(0, 0, SAGD_BF16, 1);
            } else {
                if (begin && apply) ADAM_CASE(1, 1, SAGD_BF16, 0);
                else if (begin) ADAM_CASE(1, 0, SAGD_BF16, 0);
                else if (apply) ADAM_CASE(0, 1, SAGD_BF16, 0);
                else ADAM_CASE(0, 0, SAGD_BF16, 0);
            }
        } else {
            if (sfmt == SAGD_FP32) {
                if (apply) SGD_CASE(begin, 1, SAGD_FP32, 0);
                else SGD_CASE(begin, 0, SAGD_FP32, 0);
            } else if (sr) {
                if (apply) SGD_CASE(begin, 1, SAGD_BF16, 1);
                else SGD_CASE(begin, 0, SAGD_BF16, 1);
            } else {
                if (apply) SGD_CASE(begin, 1, SAGD_BF16, 0);
                else SGD_CASE(begin, 0, SAGD_BF16, 0);
            }
        }
    }
    return bad;
}
