/* Bias, activations and their derivatives for dense layers, on blocks of rows. */
#include <math.h>
#include <string.h>

#include "sagd_kernels.h"
#include "threads.h"

#define SQRT1_2 0.70710678118654752440f
#define INV_SQRT_2PI 0.39894228040143267794f

static inline float sigmoidf(float v)
{
    /* exp of a non-positive number only: no overflow for any input */
    float e = expf(-fabsf(v));
    return v >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

static inline float activate(int act, float v)
{
    switch (act) {
    case SAGD_RELU: return v > 0.0f ? v : 0.0f;
    case SAGD_TANH: return tanhf(v);
    case SAGD_SIGMOID: return sigmoidf(v);
    case SAGD_GELU: return 0.5f * v * (1.0f + erff(v * SQRT1_2));
    default: return v;
    }
}

/* Rows per unit of parallel work: about 64K elements, so small layers stay on one thread. */
static size_t rows_per_chunk(size_t cols) { return cols >= 65536 ? 1 : 65536 / (cols ? cols : 1); }

typedef struct {
    int act;
    size_t rows, cols, ldz, lda, ldd, step;
    const float *b, *z_in, *a_in;
    float *z, *a, *d;
    int64_t bad[SAGD_MAX_THREADS];
} rows_job;

/* Pre-activations past 2^64: their products with gradients, squared by Adam, no longer
   fit in fp32. Training stops there, before any update, rather than a step later. */
#define SAGD_ACTIVATION_LIMIT 1.8446744073709552e19f

static inline int64_t count_out_of_range(const float *x, size_t n)
{
    int64_t bad = 0;
    size_t i;
    for (i = 0; i < n; i++)
        bad += !(fabsf(x[i]) < SAGD_ACTIVATION_LIMIT); /* NaN fails the test too */
    return bad;
}

static void bias_act_rows(void *ctx, long chunk, int thread)
{
    const rows_job *j = (const rows_job *)ctx;
    /* fields in locals: stores through float pointers must not make the compiler reload
       them (or give up vectorizing) */
    const size_t cols = j->cols, ldz = j->ldz, lda = j->lda, step = j->step;
    const size_t r0 = (size_t)chunk * step, r1 = r0 + step < j->rows ? r0 + step : j->rows;
    const float *b = j->b;
    const int act = j->act;
    int64_t bad = 0;
    size_t r, c;
    for (r = r0; r < r1; r++) {
        float *zr = j->z + r * ldz, *ar = j->a + r * lda;
        if (b != NULL)
            for (c = 0; c < cols; c++)
                zr[c] += b[c];
        /* relu would turn NaN and -inf into 0 and hide an overflow: count them first */
        bad += count_out_of_range(zr, cols);
        if (act == SAGD_RELU) { /* the common case, kept vectorizable */
            for (c = 0; c < cols; c++)
                ar[c] = zr[c] > 0.0f ? zr[c] : 0.0f;
        } else if (act != SAGD_IDENTITY || ar != zr) {
            for (c = 0; c < cols; c++)
                ar[c] = activate(act, zr[c]);
        }
    }
    ((rows_job *)ctx)->bad[thread] += bad;
}

int64_t sagd_bias_act(int act, size_t rows, size_t cols, const float *b, float *z,
                      size_t ldz, float *a, size_t lda)
{
    rows_job j = {0};
    j.act = act, j.rows = rows, j.cols = cols, j.b = b, j.z = z, j.ldz = ldz, j.a = a;
    j.lda = lda, j.step = rows_per_chunk(cols);
    sagd_parallel((long)((rows + j.step - 1) / j.step), bias_act_rows, &j);
    return sagd_sum_partials(j.bad);
}

static void act_backward_rows(void *ctx, long chunk, int thread)
{
    const rows_job *j = (const rows_job *)ctx;
    const size_t cols = j->cols, ld = j->lda, ldd = j->ldd, step = j->step;
    const size_t r0 = (size_t)chunk * step, r1 = r0 + step < j->rows ? r0 + step : j->rows;
    const int act = j->act;
    size_t r, c;
    (void)thread;
    for (r = r0; r < r1; r++) {
        const float *ar = j->a_in + r * ld, *zr = j->z_in + r * ld;
        float *dr = j->d + r * ldd;
        switch (act) {
        case SAGD_RELU:
            for (c = 0; c < cols; c++)
                dr[c] = ar[c] > 0.0f ? dr[c] : 0.0f;
            break;
        case SAGD_TANH:
            for (c = 0; c < cols; c++)
                dr[c] *= 1.0f - ar[c] * ar[c];
            break;
        case SAGD_SIGMOID:
            for (c = 0; c < cols; c++)
                dr[c] *= ar[c] * (1.0f - ar[c]);
            break;
        case SAGD_GELU:
            for (c = 0; c < cols; c++) {
                float v = zr[c];
                float cdf = 0.5f * (1.0f + erff(v * SQRT1_2));
                dr[c] *= cdf + v * INV_SQRT_2PI * expf(-0.5f * v * v);
            }
            break;
        default:
            break;
        }
    }
}

void sagd_act_backward(int act, size_t rows, size_t cols, const float *z, const float *a,
                       size_t ld, float *d, size_t ldd)
{
    rows_job j = {0};
    if (act == SAGD_IDENTITY)
        return;
    j.act = act, j.rows = rows, j.cols = cols, j.z_in = z, j.a_in = a, j.lda = ld, j.d = d;
    j.ldd = ldd, j.step = rows_per_chunk(cols);
    sagd_parallel((long)((rows + j.step - 1) / j.step), act_backward_rows, &j);
}

void sagd_column_sums(size_t rows, size_t cols, const float *g, size_t ldg, float *db)
{
    size_t r, c;
    for (c = 0; c < cols; c++)
        db[c] = 0.0f;
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++)
            db[c] += g[r * ldg + c];
}
