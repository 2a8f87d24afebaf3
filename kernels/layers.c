/* Bias, activations and their derivatives for dense layers, on blocks of rows. */
#include <math.h>

#include "sagd_kernels.h"

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

void sagd_bias_act(int act, size_t rows, size_t cols, const float *b, float *z, size_t ldz,
                   float *a, size_t lda)
{
    long r;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(sagd_get_threads()) \
    if (rows * cols > 65536)
#endif
    for (r = 0; r < (long)rows; r++) {
        float *zr = z + (size_t)r * ldz, *ar = a + (size_t)r * lda;
        size_t c;
        if (b != NULL)
            for (c = 0; c < cols; c++)
                zr[c] += b[c];
        if (act == SAGD_RELU) { /* the common case, kept vectorizable */
            for (c = 0; c < cols; c++)
                ar[c] = zr[c] > 0.0f ? zr[c] : 0.0f;
        } else if (act != SAGD_IDENTITY || ar != zr) {
            for (c = 0; c < cols; c++)
                ar[c] = activate(act, zr[c]);
        }
    }
}

void sagd_act_backward(int act, size_t rows, size_t cols, const float *z, const float *a,
                       size_t ld, float *d, size_t ldd)
{
    long r;
    if (act == SAGD_IDENTITY)
        return;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(sagd_get_threads()) \
    if (rows * cols > 65536)
#endif
    for (r = 0; r < (long)rows; r++) {
        const float *ar = a + (size_t)r * ld, *zr = z + (size_t)r * ld;
        float *dr = d + (size_t)r * ldd;
        size_t c;
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

void sagd_column_sums(size_t rows, size_t cols, const float *g, size_t ldg, float *db)
{
    size_t r, c;
    for (c = 0; c < cols; c++)
        db[c] = 0.0f;
    for (r = 0; r < rows; r++)
        for (c = 0; c < cols; c++)
            db[c] += g[r * ldg + c];
}
