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
#define SAGD_SPECIALIZE static __forceinline
#else
#define SAGD_RESTRICT restrict
/* Inlined at every call, where its format and mode arguments are constants: each call
   site becomes its own specialised loop. */
#define SAGD_SPECIALIZE static inline __attribute__((always_inline))
#endif

/* Elements per inner chunk: the random bits of one chunk live on the stack. */
#define CHUNK 256

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

/* Philox blocks per call: four groups of 8 lanes in flight, which keeps the multipliers
   busy (on Zen 3, 4 groups run 1.35x faster than 2). */
#define GROUPS 4
#define LANES (8 * GROUPS)

/* Words hi and lo of the 32 x 32 -> 64 bit products m * x, for 8 lanes at once. */
static inline void mulhilo8(__m256i x, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(x, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_mullo_epi32(x, m);
}

/* LANES consecutive Philox blocks. */
static void philox_lanes(uint32_t k0, uint32_t k1, uint32_t block, uint32_t c1, uint32_t c2,
                         uint32_t c3, uint32_t *SAGD_RESTRICT out)
{
    const __m256i m0 = _mm256_set1_epi32((int)SAGD_PHILOX_M0);
    const __m256i m1 = _mm256_set1_epi32((int)SAGD_PHILOX_M1);
    __m256i x0[GROUPS], x1[GROUPS], x2[GROUPS], x3[GROUPS];
    int g, r;
    for (g = 0; g < GROUPS; g++) {
        x0[g] = _mm256_add_epi32(_mm256_set1_epi32((int)(block + 8u * (uint32_t)g)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        x1[g] = _mm256_set1_epi32((int)c1);
        x2[g] = _mm256_set1_epi32((int)c2);
        x3[g] = _mm256_set1_epi32((int)c3);
    }
    for (r = 0; r < SAGD_PHILOX_ROUNDS; r++) {
        const __m256i kk0 = _mm256_set1_epi32((int)k0), kk1 = _mm256_set1_epi32((int)k1);
        for (g = 0; g < GROUPS; g++) {
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
    for (g = 0; g < GROUPS; g++) {
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
/* Philox blocks computed side by side (structure of arrays, so the compiler vectorizes). */
#define LANES 16

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
        } else if ((j & 3) == 0 && n - done >= 32) { /* the lanes beat 8+ single blocks */
            uint32_t tail[4 * LANES];
            philox_lanes(k0, k1, (uint32_t)(j >> 2), s, lo, hi, tail);
            memcpy(out + done, tail, (n - done) * sizeof *out);
            j += n - done;
            done = n;
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

/* Random words seen as 32-bit words or as their 16-bit halves, low half first. */
typedef union {
    uint32_t words[CHUNK + 2];
    uint16_t halves[2 * CHUNK + 4];
} bit_buffer;

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define SAGD_BIG_ENDIAN 1
#endif

/* 16 random bits for each element e0 .. e0 + n - 1 (n <= 2 * CHUNK): element e takes half
   e % 2 of word e / 2. On little-endian machines the union's halves are exactly that. */
static const uint16_t *bits16(const sagd_rng *rng, uint64_t e0, size_t n, bit_buffer *b)
{
    const size_t off = (size_t)(e0 & 1), nw = (off + n + 1) / 2;
    HOT(random_words)(rng, e0 >> 1, nw, b->words);
#ifdef SAGD_BIG_ENDIAN
    {
        size_t t;
        for (t = 0; t < nw; t++)
            b->words[t] = (b->words[t] << 16) | (b->words[t] >> 16);
    }
#endif
    return b->halves + off;
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
    h = ((stochastic != 0) & (h > 0x7f7fu)) ? 0x7f7fu : h;
    h = mag > 0x7f800000u ? 0x7fc0u : (mag == 0x7f800000u ? 0x7f80u : h);
    return (uint16_t)(sign | h);
}

static inline float bf16_to(uint16_t h) { return u2f((uint32_t)h << 16); }

/* bf16_from(x, r16, 1) for finite x, in fewer operations: the sign rides along (a carry out
   of the magnitude stops below bit 31), and a carry into the exponent's all-ones pattern
   (only from the largest finite values) falls back to the largest finite bf16. */
static inline uint16_t bf16_sr_finite(float x, uint32_t r16)
{
    uint32_t h = (f2u(x) + (r16 ^ 0xFFFFu)) >> 16;
    h -= (h & 0x7fffu) == 0x7f80u;
    return (uint16_t)h;
}

static inline uint16_t fp16_from(float x, uint32_t r, int stochastic)
{
    const uint32_t b = f2u(x), sign = (b >> 16) & 0x8000u, mag = b & 0x7fffffffu;
    const int32_t e = (int32_t)(mag >> 23);
    const int32_t eff = e ? e : 1; /* fp32 subnormals share the smallest normal's exponent */
    const uint32_t sig = (mag & 0x7fffffu) | (e ? 0x800000u : 0u);
    /* k: bits of sig below the fp16 grid at this magnitude, 13 for fp16 normals, more below
       (up to 125). sig < 2^24, so from k = 24 on everything is below the grid. */
    const int32_t k = 13 + (eff < 113 ? 113 - eff : 0);
    const uint32_t base = (uint32_t)((eff > 113 ? eff : 113) - 113) << 10;
    const uint32_t q = k < 32 ? sig >> k : 0u;
    const uint32_t rem = k < 32 ? sig & ((1u << k) - 1u) : sig;
    /* Stochastic: up iff the top k bits of r, uniform on [0, 2^k), are below rem: P(up) =
       rem / 2^k exactly while k <= 32 (|x| >= 2^-33), to 2^-32 below. 32-bit arithmetic
       only, so the loop vectorizes. Nearest: ties to even. */
    const uint32_t up_sr = k <= 32 ? ((r >> (32 - k)) < rem)
                                   : (k < 56 ? (r < (rem >> (k - 32))) : 0u);
    const uint32_t half = k <= 25 ? 1u << (k - 1) : 0u;
    const uint32_t up_rn = k <= 25 ? (rem > half) | ((rem == half) & (q & 1u)) : 0u;
    uint32_t h = base + q + (stochastic ? up_sr : up_rn);
    h = stochastic ? (h > 0x7bffu ? 0x7bffu : h) : (h > 0x7c00u ? 0x7c00u : h);
    {   /* inf, or NaN keeping the top of its payload as numpy does */
        const uint32_t payload = (mag & 0x7fffffu) >> 13;
        const uint32_t special = (mag & 0x7fffffu) ? 0x7c00u | payload | (payload == 0)
                                                   : 0x7c00u;
        h = e == 0xff ? special : h;
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
       double keeps the fraction of |x| / scale exact to ~2^-46; u = r / 2^32 is converted
       through a signed integer, which vector units can do exactly. */
    const double t = fabs((double)x) / (double)scale;
    const double u = ((double)(int32_t)(r ^ 0x80000000u) + 2147483648.0) * 0x1p-32;
    const double f = floor(t);
    double q = stochastic ? f + (u < t - f ? 1.0 : 0.0) : nearbyint(t);
    q = q > 127.0 ? 127.0 : q;
    q = x < 0.0f ? -q : q;
    return finite_f(x) ? (int8_t)(int32_t)q : (int8_t)0;
}

int64_t HOT(encode)(int fmt, const float *SAGD_RESTRICT x, size_t n, void *SAGD_RESTRICT out,
                    float scale, const sagd_rng *rng, uint64_t first_elem)
{
    bit_buffer bits;
    uint32_t *words = bits.words;
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
                const uint16_t *r = bits16(rng, first_elem + s, len, &bits);
                for (i = 0; i < len; i++)
                    o[i] = bf16_from(xs[i], r[i], 1);
            } else {
                for (i = 0; i < len; i++)
                    o[i] = bf16_from(xs[i], 0, 0);
            }
        } else if (fmt == SAGD_FP16) {
            uint16_t *o = (uint16_t *)out + s;
            if (sr) {
                const uint32_t *SAGD_RESTRICT r = words;
                HOT(random_words)(rng, first_elem + s, len, words);
                for (i = 0; i < len; i++)
                    o[i] = fp16_from(xs[i], r[i], 1);
            } else {
                for (i = 0; i < len; i++)
                    o[i] = fp16_from(xs[i], 0, 0);
            }
        } else { /* SAGD_INT8 */
            int8_t *o = (int8_t *)out + s;
            if (sr) {
                const uint32_t *SAGD_RESTRICT r = words;
                HOT(random_words)(rng, first_elem + s, len, words);
                for (i = 0; i < len; i++)
                    o[i] = int8_from(xs[i], scale, r[i], 1);
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

/*
 * A step works chunk by chunk, in three passes over values that stay in L1: decode the
 * 16-bit runs into fp32, update in fp32, round the new values back. fp32 runs are updated
 * in place. Each pass is a simple loop over one type, which compilers vectorize without
 * running out of registers, and the update loop is the same for every storage format.
 */

/* The values of one chunk of a run, as fp32: the run itself, or its decoded copy in tmp. */
static float *chunk_values(const sagd_stored *t, size_t s, size_t n, float *tmp)
{
    if (t->fmt == SAGD_FP32)
        return (float *)t->data + s;
    HOT(decode)(t->fmt, (const uint16_t *)t->data + s, n, 1.0f, tmp);
    return tmp;
}

/* Round a chunk's new values x back into a 16-bit run (fp32 runs were updated in place).
   Every value is finite (update_values keeps the old value of an element whose new ones
   are not), and an old value rounds back to its old code exactly. */
static void chunk_store(const sagd_stored *t, size_t s, size_t n, const float *x,
                        uint64_t e0)
{
    bit_buffer b;
    uint16_t *SAGD_RESTRICT o;
    size_t i;
    if (t->fmt == SAGD_FP32)
        return;
    o = (uint16_t *)t->data + s;
    if (t->rng == NULL) {
        if (t->fmt == SAGD_BF16)
            for (i = 0; i < n; i++)
                o[i] = bf16_from(x[i], 0, 0);
        else
            for (i = 0; i < n; i++)
                o[i] = fp16_from(x[i], 0, 0);
    } else if (t->fmt == SAGD_BF16) {
        const uint16_t *SAGD_RESTRICT r = bits16(t->rng, e0 + s, n, &b);
        for (i = 0; i < n; i++)
            o[i] = bf16_sr_finite(x[i], r[i]);
    } else {
        const uint32_t *SAGD_RESTRICT r = b.words;
        HOT(random_words)(t->rng, e0 + s, n, b.words);
        for (i = 0; i < n; i++)
            o[i] = fp16_from(x[i], r[i], 1);
    }
}

/*
 * The update of n values in fp32: new state into m and v, and (apply) the new weights into
 * w. An element whose new values are not all finite keeps its old ones and is counted.
 * kind, has_m and apply are literal constants at every call site, so each combination
 * compiles into its own branch-free loop.
 */
SAGD_SPECIALIZE int update_values(const sagd_optim *o, int kind, int has_m, int apply,
                                  int begin, size_t n, float *SAGD_RESTRICT w,
                                  const float *SAGD_RESTRICT g, float *SAGD_RESTRICT m,
                                  float *SAGD_RESTRICT v)
{
    const float lr = o->lr, mu = o->momentum, gs = o->gscale, eps = o->eps;
    const float a1 = 1.0f - o->beta1, a2 = (1.0f - o->beta2) * o->vscale;
    const float bc1 = o->bc1, bc2 = o->bc2, l2 = begin ? o->l2 : 0.0f;
    const float keep1 = begin ? (kind == SAGD_ADAM ? o->beta1 : mu) : 1.0f;
    const float keep2 = begin ? o->beta2 : 1.0f;
    /* weight decay enters once per step; plain SGD applies every pass, so only the first */
    const float decay = (begin || has_m) ? o->decay : 0.0f;
    const float nest = o->nesterov ? 1.0f : 0.0f;
    int bad = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        const float wi = w[i], gi = g[i] + l2 * wi;
        float mn = 0.0f, vn = 0.0f, upd = gi, wn;
        int ok;
        if (kind == SAGD_ADAM) {
            mn = keep1 * m[i] + a1 * gi;
            vn = keep2 * v[i] + a2 * (gi * gi);
            upd = (mn * bc1) / (sqrtf(vn * bc2) + eps);
        } else if (has_m) {
            mn = keep1 * m[i] + gi;
            upd = nest * (gs * gi + mu * mn) + (1.0f - nest) * mn;
        }
        wn = wi - lr * (upd + decay * wi);
        /* A non-finite first moment makes the new weight non-finite too, so when the step
           applies, checking the weight (and Adam's second moment) covers every value. */
        ok = (kind == SAGD_ADAM ? finite_f(vn) : 1) & (apply ? finite_f(wn) : finite_f(mn));
        if (has_m)
            m[i] = ok ? mn : m[i];
        if (kind == SAGD_ADAM)
            v[i] = ok ? vn : v[i];
        if (apply)
            w[i] = ok ? wn : wi;
        bad += !ok;
    }
    return bad;
}

int64_t HOT(optim_step)(const sagd_optim *o, int phase, size_t n, const sagd_stored *w,
                        float *g, const sagd_stored *m, const sagd_stored *v,
                        uint64_t first_elem)
{
    float wt[CHUNK], mt[CHUNK], vt[CHUNK];
    const int begin = (phase & SAGD_BEGIN) != 0;
    const int has_m = m->data != NULL, adam = o->kind == SAGD_ADAM;
    const int apply = (phase & SAGD_APPLY) != 0 || !has_m; /* plain SGD applies every pass */
    int64_t bad = 0;
    size_t s;
    for (s = 0; s < n; s += CHUNK) {
        const size_t len = n - s < CHUNK ? n - s : CHUNK;
        float *wv = chunk_values(w, s, len, wt);
        float *mv = has_m ? chunk_values(m, s, len, mt) : NULL;
        float *vv = adam ? chunk_values(v, s, len, vt) : NULL;
        if (adam)
            bad += apply ? update_values(o, SAGD_ADAM, 1, 1, begin, len, wv, g + s, mv, vv)
                         : update_values(o, SAGD_ADAM, 1, 0, begin, len, wv, g + s, mv, vv);
        else if (!has_m)
            bad += update_values(o, SAGD_SGD, 0, 1, begin, len, wv, g + s, NULL, NULL);
        else
            bad += apply ? update_values(o, SAGD_SGD, 1, 1, begin, len, wv, g + s, mv, NULL)
                         : update_values(o, SAGD_SGD, 1, 0, begin, len, wv, g + s, mv, NULL);
        if (has_m)
            chunk_store(m, s, len, mv, first_elem);
        if (adam)
            chunk_store(v, s, len, vv, first_elem);
        if (apply)
            chunk_store(w, s, len, wv, first_elem);
    }
    return bad;
}
