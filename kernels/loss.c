/* Losses and their gradients, computed stably in fp32 (sums in double). */
#include <math.h>

#include "sagd_kernels.h"

static inline float softplusf(float v)
{
    /* log(1 + e^v) without overflow */
    return (v > 0.0f ? v : 0.0f) + log1pf(expf(-fabsf(v)));
}

/* Largest entry of a row, and the sum of exp(z - max): the row's log-sum-exp parts. */
static inline float row_max(const float *z, size_t k)
{
    float mx = z[0];
    size_t c;
    for (c = 1; c < k; c++)
        mx = z[c] > mx ? z[c] : mx;
    return mx;
}

double sagd_softmax_xent(size_t rows, size_t k, float *z, size_t ldz, const int32_t *y,
                         const float *w, float scale, int grad)
{
    double total = 0.0;
    size_t r, c;
    for (r = 0; r < rows; r++) {
        float *zr = z + r * ldz;
        float mx = row_max(zr, k), s = 0.0f, wr = w ? w[r] : 1.0f;
        for (c = 0; c < k; c++)
            s += expf(zr[c] - mx);
        total += (double)wr * ((double)mx + log((double)s) - (double)zr[y[r]]);
        if (grad) {
            float f = wr * scale, inv = 1.0f / s;
            for (c = 0; c < k; c++)
                zr[c] = f * (expf(zr[c] - mx) * inv - (c == (size_t)y[r] ? 1.0f : 0.0f));
        }
    }
    return total;
}

double sagd_sigmoid_xent(size_t rows, float *z, size_t ldz, const int32_t *y, const float *w,
                         float scale, int grad)
{
    double total = 0.0;
    size_t r;
    for (r = 0; r < rows; r++) {
        float v = z[r * ldz], t = y[r] ? 1.0f : 0.0f, wr = w ? w[r] : 1.0f;
        total += (double)wr * (double)(softplusf(v) - v * t);
        if (grad) {
            float e = expf(-fabsf(v)), p = v >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
            z[r * ldz] = wr * scale * (p - t);
        }
    }
    return total;
}

double sagd_squared_error(size_t rows, size_t k, float *z, size_t ldz, const float *y,
                          size_t ldy, const float *w, float scale, int grad)
{
    double total = 0.0;
    size_t r, c;
    for (r = 0; r < rows; r++) {
        float *zr = z + r * ldz, wr = w ? w[r] : 1.0f;
        const float *yr = y + r * ldy;
        double s = 0.0;
        for (c = 0; c < k; c++) {
            float d = zr[c] - yr[c];
            s += (double)d * d;
            if (grad)
                zr[c] = wr * scale * d;
        }
        total += 0.5 * (double)wr * s;
    }
    return total;
}

void sagd_softmax(size_t rows, size_t k, float *z, size_t ldz)
{
    size_t r, c;
    for (r = 0; r < rows; r++) {
        float *zr = z + r * ldz;
        float mx = row_max(zr, k), s = 0.0f;
        for (c = 0; c < k; c++) {
            zr[c] = expf(zr[c] - mx);
            s += zr[c];
        }
        for (c = 0; c < k; c++)
            zr[c] /= s;
    }
}

void sagd_sigmoid(size_t n, float *z)
{
    size_t i;
    for (i = 0; i < n; i++) {
        float e = expf(-fabsf(z[i]));
        z[i] = z[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    }
}
