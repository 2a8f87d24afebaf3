/*
 * Public entry points of the hot kernels: choose the SIMD implementation at run time and
 * split long runs across sagd's threads. Work is cut at fixed element offsets and every
 * element's random bits come from its own counter, so results do not depend on the
 * number of threads.
 */
#include <stdlib.h>
#include <string.h>

#include "hot.h"
#include "philox.h"
#include "threads.h"

typedef struct {
    void (*random_words)(const sagd_rng *, uint64_t, size_t, uint32_t *);
    int64_t (*encode)(int, const float *, size_t, void *, float, const sagd_rng *, uint64_t);
    void (*decode)(int, const void *, size_t, float, float *);
    int64_t (*optim_step)(const sagd_optim *, int, size_t, const sagd_stored *, float *,
                          const sagd_stored *, const sagd_stored *, uint64_t);
} hot_impl;

static const hot_impl impl_generic = {sagd_hot_random_words_generic, sagd_hot_encode_generic,
                                      sagd_hot_decode_generic, sagd_hot_optim_step_generic};
#ifdef SAGD_HAVE_AVX2
static const hot_impl impl_avx2 = {sagd_hot_random_words_avx2, sagd_hot_encode_avx2,
                                   sagd_hot_decode_avx2, sagd_hot_optim_step_avx2};
#endif

static const hot_impl *impl = &impl_generic;
static int impl_level = SAGD_SIMD_GENERIC;

int sagd_simd_available(int level)
{
    if (level == SAGD_SIMD_GENERIC)
        return 1;
#ifdef SAGD_HAVE_AVX2
    if (level == SAGD_SIMD_AVX2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") != 0;
    }
#endif
    return 0;
}

int sagd_simd_select(int level)
{
#ifdef SAGD_HAVE_AVX2
    if (level == SAGD_SIMD_AVX2 && sagd_simd_available(SAGD_SIMD_AVX2)) {
        impl = &impl_avx2;
        impl_level = SAGD_SIMD_AVX2;
        return impl_level;
    }
#endif
    (void)level;
    impl = &impl_generic;
    impl_level = SAGD_SIMD_GENERIC;
    return impl_level;
}

int sagd_simd_current(void) { return impl_level; }

/* Elements per unit of parallel work: a multiple of 2, so 16-bit pairs never straddle. */
#define PAR_CHUNK 16384

static size_t elem_size(int fmt)
{
    return fmt == SAGD_FP32 ? 4 : (fmt == SAGD_INT8 ? 1 : 2);
}

static long n_chunks(size_t n) { return (long)((n + PAR_CHUNK - 1) / PAR_CHUNK); }

static size_t chunk_len(size_t n, long c)
{
    size_t off = (size_t)c * PAR_CHUNK;
    return n - off < PAR_CHUNK ? n - off : PAR_CHUNK;
}

/* ---------------------------------------------------------------- entry points */

void sagd_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    memcpy(out, ctr, 4 * sizeof(uint32_t));
    sagd_philox_block(out, key[0], key[1]);
}

void sagd_random_words(const sagd_rng *rng, uint64_t first_word, size_t n, uint32_t *out)
{
    impl->random_words(rng, first_word, n, out);
}

void sagd_uniform(const sagd_rng *rng, uint64_t first_word, size_t n, float lo, float hi,
                  float *out)
{
    const float width = hi - lo;
    size_t i;
    impl->random_words(rng, first_word, n, (uint32_t *)out);
    for (i = 0; i < n; i++) {
        uint32_t w;
        memcpy(&w, out + i, sizeof w);
        out[i] = lo + width * ((float)(w >> 8) * 5.9604644775390625e-8f);
    }
}

typedef struct {
    int fmt;
    const float *x;
    size_t n;
    char *out;
    float scale;
    const sagd_rng *rng;
    uint64_t first;
    int64_t partial[SAGD_MAX_THREADS];
} encode_job;

static void encode_chunk(void *ctx, long c, int thread)
{
    encode_job *j = (encode_job *)ctx;
    size_t off = (size_t)c * PAR_CHUNK;
    j->partial[thread] += impl->encode(j->fmt, j->x + off, chunk_len(j->n, c),
                                       j->out + off * elem_size(j->fmt), j->scale, j->rng,
                                       j->first + off);
}

int64_t sagd_encode(int fmt, const float *x, size_t n, void *out, float scale,
                    const sagd_rng *rng, uint64_t first_elem)
{
    encode_job j = {0};
    j.fmt = fmt, j.x = x, j.n = n, j.out = (char *)out, j.scale = scale, j.rng = rng;
    j.first = first_elem;
    sagd_parallel(n_chunks(n), encode_chunk, &j);
    return sagd_sum_partials(j.partial);
}

typedef struct {
    int fmt;
    const char *in;
    size_t n;
    float scale;
    float *out;
} decode_job;

static void decode_chunk(void *ctx, long c, int thread)
{
    decode_job *j = (decode_job *)ctx;
    size_t off = (size_t)c * PAR_CHUNK;
    (void)thread;
    impl->decode(j->fmt, j->in + off * elem_size(j->fmt), chunk_len(j->n, c), j->scale,
                 j->out + off);
}

void sagd_decode(int fmt, const void *in, size_t n, float scale, float *out)
{
    decode_job j;
    j.fmt = fmt, j.in = (const char *)in, j.n = n, j.scale = scale, j.out = out;
    sagd_parallel(n_chunks(n), decode_chunk, &j);
}

typedef struct {
    const sagd_optim *opt;
    int phase;
    size_t n;
    const sagd_stored *w, *m, *v;
    float *g;
    uint64_t first;
    int64_t partial[SAGD_MAX_THREADS];
} optim_job;

/* The part of a stored run that starts `off` elements in. */
static sagd_stored offset(const sagd_stored *t, size_t off)
{
    sagd_stored r = *t;
    if (r.data != NULL)
        r.data = (char *)r.data + off * elem_size(r.fmt);
    return r;
}

static void optim_chunk(void *ctx, long c, int thread)
{
    optim_job *j = (optim_job *)ctx;
    const size_t off = (size_t)c * PAR_CHUNK;
    const sagd_stored w = offset(j->w, off), m = offset(j->m, off), v = offset(j->v, off);
    j->partial[thread] += impl->optim_step(j->opt, j->phase, chunk_len(j->n, c), &w,
                                           j->g + off, &m, &v, j->first + off);
}

int64_t sagd_optim_step(const sagd_optim *opt, int phase, size_t n, const sagd_stored *w,
                        float *g, const sagd_stored *m, const sagd_stored *v,
                        uint64_t first_elem)
{
    optim_job j = {0};
    j.opt = opt, j.phase = phase, j.n = n, j.w = w, j.m = m, j.v = v, j.g = g;
    j.first = first_elem;
    sagd_parallel(n_chunks(n), optim_chunk, &j);
    return sagd_sum_partials(j.partial);
}

/* ---------------------------------------------------------------- permutation */

/* A 4-round Feistel network on 2 * half bits with Philox as its round function. */
static uint64_t feistel(uint64_t x, int half, uint32_t k0, uint32_t k1, uint32_t round)
{
    const uint64_t mask = (half >= 64) ? ~0ull : ((1ull << half) - 1);
    uint64_t l = x >> half, r = x & mask;
    uint32_t i;
    for (i = 0; i < 4; i++) {
        uint32_t c[4];
        uint64_t f;
        c[0] = (uint32_t)r;
        c[1] = (uint32_t)(r >> 32);
        c[2] = round;
        c[3] = 0x5EED0000u + i; /* a counter space training steps never reach */
        sagd_philox_block(c, k0, k1);
        f = (((uint64_t)c[1] << 32) | c[0]) & mask;
        {
            uint64_t t = r;
            r = l ^ f;
            l = t;
        }
    }
    return (l << half) | r;
}

void sagd_permute(uint64_t n, uint64_t seed, uint32_t round, const int64_t *in, size_t count,
                  int64_t *out)
{
    int bits = 2, half;
    size_t j;
    while (bits < 64 && (1ull << bits) < n)
        bits += 2;
    half = bits / 2;
    for (j = 0; j < count; j++) {
        /* Cycle-walk: apply the permutation of [0, 2^bits) until the value falls in [0, n). */
        uint64_t y = feistel((uint64_t)in[j], half, (uint32_t)seed, (uint32_t)(seed >> 32), round);
        while (y >= n)
            y = feistel(y, half, (uint32_t)seed, (uint32_t)(seed >> 32), round);
        out[j] = (int64_t)y;
    }
}
