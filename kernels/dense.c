/*
 * Dense layers over tiles of rows of the weight matrix, with the products done by a BLAS
 * sgemm the caller passes in. Tiles run in parallel on sagd's threads, each thread with
 * its own slot of scratch; BLAS should then be single-threaded (sagd/blas.py arranges it),
 * so that one set of threads does all the work and none spins waiting for another.
 *
 * Forward:  z[:, R] = a @ W[R]^T + b[R], out = act(z)              (tiles R in parallel)
 * Backward: dA = g @ W (weights before the update)       (column blocks of dA in parallel)
 *           then per tile R: dW = g[:, R]^T a, db = sum g[:, R], the fused update of
 *           W[R] and b[R] and their optimizer state          (tiles R in parallel)
 * No buffer the size of W exists: a tile's gradient lives in its thread's scratch.
 * Given the list of a batch's nonzero input columns (sagd_nonzero_columns), the first layer
 * runs both products over those columns alone: the forward pass gathers them from each
 * tile of W, and the tile's weight gradient is computed for them and spread back into a
 * full row of zeros before the update.
 */
#include <string.h>

#include "sagd_kernels.h"
#include "threads.h"

static size_t code_size(int fmt) { return fmt == SAGD_FP32 ? 4 : (fmt == SAGD_INT8 ? 1 : 2); }

static char *row_of(const sagd_tensor *t, size_t r)
{
    return (char *)t->data + r * t->cols * code_size(t->fmt);
}

/* One stream per tensor and write pass: micro-batch passes of one step differ. */
static sagd_rng rng_for(const sagd_update *u, uint32_t tensor_id)
{
    sagd_rng r;
    r.seed = u->seed;
    r.step = u->step;
    r.stream = (tensor_id << 16) | (u->micro & 0xffffu);
    return r;
}

void sagd_tensor_decode(const sagd_tensor *t, size_t r0, size_t r1, size_t c0, size_t c1,
                        float *out, size_t ldo)
{
    size_t r;
    if (c0 == 0 && c1 == t->cols && ldo == t->cols && t->fmt != SAGD_INT8) {
        sagd_decode(t->fmt, row_of(t, r0), (r1 - r0) * t->cols, 1.0f, out);
        return;
    }
    for (r = r0; r < r1; r++)
        sagd_decode(t->fmt, row_of(t, r) + c0 * code_size(t->fmt), c1 - c0,
                    t->fmt == SAGD_INT8 ? t->scales[r] : 1.0f, out + (r - r0) * ldo);
}

void sagd_tensor_decode_columns(const sagd_tensor *t, size_t r0, size_t r1,
                                const int32_t *cols, size_t n, float *out, size_t ldo)
{
    /* codes gathered a block at a time, then decoded as a run */
    union {
        uint32_t c32[256];
        uint16_t c16[256];
        uint8_t c8[256];
    } block;
    const size_t size = code_size(t->fmt);
    size_t r, s, j;
    for (r = r0; r < r1; r++) {
        const char *row = row_of(t, r);
        const float scale = t->fmt == SAGD_INT8 ? t->scales[r] : 1.0f;
        for (s = 0; s < n; s += 256) {
            const size_t len = n - s < 256 ? n - s : 256;
            const int32_t *c = cols + s;
            if (size == 4)
                for (j = 0; j < len; j++)
                    block.c32[j] = ((const uint32_t *)row)[c[j]];
            else if (size == 2)
                for (j = 0; j < len; j++)
                    block.c16[j] = ((const uint16_t *)row)[c[j]];
            else
                for (j = 0; j < len; j++)
                    block.c8[j] = ((const uint8_t *)row)[c[j]];
            sagd_decode(t->fmt, &block, len, scale, out + (r - r0) * ldo + s);
        }
    }
}

size_t sagd_nonzero_columns(size_t rows, size_t cols, const float *x, size_t ld, int32_t *idx)
{
    /* idx first holds, per column, the OR of its magnitudes' bits */
    uint32_t *any = (uint32_t *)idx;
    size_t r, c, n = 0;
    for (c = 0; c < cols; c++)
        any[c] = 0;
    for (r = 0; r < rows; r++) {
        const uint32_t *xr = (const uint32_t *)(x + r * ld);
        for (c = 0; c < cols; c++)
            any[c] |= xr[c] & 0x7fffffffu;
    }
    for (c = 0; c < cols; c++) /* n <= c: the list overwrites flags already read */
        if (any[c])
            idx[n++] = (int32_t)c;
    return n;
}

void sagd_pack_columns(size_t rows, float *x, size_t ld, const int32_t *idx, size_t n)
{
    size_t r, j;
    for (r = 0; r < rows; r++) { /* destinations never pass their sources: n <= ld */
        const float *src = x + r * ld;
        float *dst = x + r * n;
        for (j = 0; j < n; j++)
            dst[j] = src[idx[j]];
    }
}

/* In place: the rows x n block of gradients for the columns cols that ends where g's rows x
   n_all floats end becomes the rows x n_all block of every column, zero elsewhere. Row r
   is written where it ends before its source begins (most rows: a memset and a scatter);
   otherwise in ascending order, each write at or below the value it reads next, and below
   the sources of the rows after it. */
static float *packed_block(float *g, size_t rows, size_t n_all, size_t n)
{
    return g + rows * (n_all - n);
}

static void spread_columns(float *g, size_t rows, size_t n_all, const int32_t *cols, size_t n)
{
    const float *packed = packed_block(g, rows, n_all, n);
    size_t r, j, c;
    for (r = 0; r < rows; r++) {
        const float *src = packed + r * n;
        float *dst = g + r * n_all;
        if (dst + n_all <= src) {
            memset(dst, 0, n_all * sizeof *dst);
            for (j = 0; j < n; j++)
                dst[cols[j]] = src[j];
            continue;
        }
        for (j = 0, c = 0; j < n; j++) {
            const float v = src[j];
            while (c < (size_t)cols[j])
                dst[c++] = 0.0f;
            dst[c++] = v;
        }
        while (c < n_all)
            dst[c++] = 0.0f;
    }
}

int64_t sagd_tensor_write(sagd_tensor *t, size_t r0, size_t r1, const float *x,
                          const sagd_rng *rng)
{
    int64_t bad = 0;
    size_t r, c;
    if (t->fmt != SAGD_INT8)
        return sagd_encode(t->fmt, x, (r1 - r0) * t->cols, row_of(t, r0), 1.0f, rng,
                           r0 * t->cols);
    for (r = r0; r < r1; r++) {
        /* a row gets the scale max|row| / 127 when it has outgrown its range or uses less
           than half of it */
        const float *xr = x + (r - r0) * t->cols;
        float mx = 0.0f, sc = t->scales[r];
        for (c = 0; c < t->cols; c++) {
            float v = xr[c] >= 0.0f ? xr[c] : -xr[c];
            mx = v > mx ? v : mx; /* NaN never wins this comparison */
        }
        if (!(sc > 0.0f))
            sc = 1.0f;
        if (mx > 0.0f && mx < 3.0e38f && (mx > 127.0f * sc || mx < 63.5f * sc))
            sc = mx / 127.0f;
        t->scales[r] = sc;
        bad += sagd_encode(SAGD_INT8, xr, t->cols, row_of(t, r), sc, rng, r * t->cols);
    }
    return bad;
}

int64_t sagd_update_rows(const sagd_update *u, sagd_tensor *p, size_t r0, size_t r1,
                         float *decoded, float *g, sagd_tensor *m, sagd_tensor *v)
{
    const size_t n = (r1 - r0) * p->cols;
    const sagd_rng rp = rng_for(u, p->id);
    sagd_rng rm, rv;
    sagd_stored sw, sm, sv;
    int phase = u->phase;
    int64_t bad;
    if (m == NULL) /* plain SGD applies every pass */
        phase |= SAGD_APPLY;
    memset(&sm, 0, sizeof sm);
    sm.fmt = SAGD_FP32;
    sm.scale = 1.0f;
    sv = sm;
    if (m != NULL) {
        rm = rng_for(u, m->id);
        sm.data = row_of(m, r0);
        sm.fmt = m->fmt;
        sm.rng = u->stochastic ? &rm : NULL;
    }
    if (v != NULL) {
        rv = rng_for(u, v->id);
        sv.data = row_of(v, r0);
        sv.fmt = v->fmt;
        sv.rng = u->stochastic ? &rv : NULL;
    }
    sw.scale = 1.0f;
    if (p->fmt == SAGD_INT8) { /* updated as fp32, then each row rescaled and rounded */
        sagd_tensor_decode(p, r0, r1, 0, p->cols, decoded, p->cols);
        sw.data = decoded;
        sw.fmt = SAGD_FP32;
        sw.rng = NULL;
    } else {
        sw.data = row_of(p, r0);
        sw.fmt = p->fmt;
        sw.rng = u->stochastic ? &rp : NULL;
    }
    bad = sagd_optim_step(&u->opt, phase, n, &sw, g, &sm, &sv, r0 * p->cols);
    if (p->fmt == SAGD_INT8 && (phase & SAGD_APPLY))
        bad += sagd_tensor_write(p, r0, r1, decoded, u->stochastic ? &rp : NULL);
    return bad;
}

/* ---------------------------------------------------------------- BLAS */

static float *at(const sagd_matrix *x, size_t r, size_t c)
{
    return x->p + (x->colmajor ? c * (size_t)x->ld + r : r * (size_t)x->ld + c);
}

/* Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X^T when t is set. BLAS is
   column-major, so it computes C^T = op(B)^T op(A)^T: the operands swap. */
static void gemm(sagd_sgemm_fn f, int ta, const sagd_matrix *A, int tb, const sagd_matrix *B,
                 int m, int n, int k, float alpha, float beta, float *C, int ldc)
{
    char ca = (ta ^ A->colmajor) ? 'T' : 'N', cb = (tb ^ B->colmajor) ? 'T' : 'N';
    int lda = A->ld, ldb = B->ld;
    if (m == 0 || n == 0)
        return;
    f(&cb, &ca, &n, &m, &k, &alpha, B->p, &ldb, A->p, &lda, &beta, C, &ldc);
}

static sagd_matrix rows_of(float *p, int ld)
{
    sagd_matrix x;
    x.p = p;
    x.ld = ld;
    x.colmajor = 0;
    return x;
}

/* ---------------------------------------------------------------- forward */

typedef struct {
    sagd_sgemm_fn gemm;
    int act;
    size_t batch, tile, slot;
    const sagd_matrix *a;
    const int32_t *cols;
    size_t n_cols;
    const sagd_tensor *W, *b;
    float *z, *out, *scratch;
    size_t ldz, ldo;
    int64_t bad[SAGD_MAX_THREADS];
} forward_job;

/* Row stride of a tile of k columns decoded for sgemm. Rows a multiple of 4 KiB apart fall
   into the same cache sets, and sgemm packing such a tile runs about 15% slower (OpenBLAS,
   k = 1024 or 2048): those rows get one cache line more. */
static size_t tile_ld(size_t k)
{
    return k > 0 && k % 1024 == 0 ? k + 16 : k;
}

/* Floats per row of the forward pass's decoded tile: tile_ld of n_in, or with a subset of
   columns, of any k <= n_in. */
static size_t widest_tile_ld(size_t n_in, int subset)
{
    const size_t ld = tile_ld(subset ? n_in / 1024 * 1024 : n_in);
    return ld > n_in ? ld : n_in;
}

/* fp32 weights are read where they are stored unless a subset of columns is wanted or the
   row stride would slow sgemm down. */
static int forward_decodes(int wfmt, size_t n_in, int subset)
{
    return wfmt != SAGD_FP32 || subset || tile_ld(n_in) != n_in;
}

static void forward_tile(void *ctx, long tile, int thread)
{
    forward_job *j = (forward_job *)ctx;
    const sagd_tensor *W = j->W, *b = j->b;
    const size_t n_in = W->cols, r0 = (size_t)tile * j->tile;
    const size_t r1 = r0 + j->tile < W->rows ? r0 + j->tile : W->rows;
    const size_t k = j->cols ? j->n_cols : n_in, ld = tile_ld(k);
    const int decodes = forward_decodes(W->fmt, n_in, j->cols != NULL);
    float *wbuf = j->scratch + (size_t)thread * j->slot;
    float *bbuf = wbuf + (decodes ? j->tile * widest_tile_ld(n_in, j->cols != NULL) : 0);
    const float *bias = NULL;
    sagd_matrix Wt;
    if (j->cols) {
        sagd_tensor_decode_columns(W, r0, r1, j->cols, k, wbuf, ld);
        Wt = rows_of(wbuf, (int)ld);
    } else if (decodes) {
        sagd_tensor_decode(W, r0, r1, 0, n_in, wbuf, ld);
        Wt = rows_of(wbuf, (int)ld);
    } else {
        Wt = rows_of((float *)row_of(W, r0), (int)n_in);
    }
    gemm(j->gemm, 0, j->a, 1, &Wt, (int)j->batch, (int)(r1 - r0), (int)k, 1.0f, 0.0f,
         j->z + r0, (int)j->ldz);
    if (b != NULL) {
        if (b->fmt == SAGD_FP32) {
            bias = (const float *)row_of(b, r0);
        } else {
            sagd_tensor_decode(b, r0, r1, 0, 1, bbuf, 1);
            bias = bbuf;
        }
    }
    j->bad[thread] += sagd_bias_act(j->act, j->batch, r1 - r0, bias, j->z + r0, j->ldz,
                                    j->out + r0, j->ldo);
}

size_t sagd_forward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in, int subset)
{
    return (forward_decodes(wfmt, n_in, subset) ? tile_rows * widest_tile_ld(n_in, subset) : 0)
           + (bfmt != SAGD_FP32 ? tile_rows : 0);
}

size_t sagd_backward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in)
{
    /* biases are updated straight from their codes; a training step's forward pass runs in
       the same scratch, with any subset of the columns */
    const size_t backward = tile_rows * n_in + tile_rows
                            + (wfmt != SAGD_FP32 ? tile_rows * n_in : 0);
    const size_t forward = sagd_forward_slot(wfmt, bfmt, tile_rows, n_in, 1);
    return backward > forward ? backward : forward;
}

int64_t sagd_dense_forward(sagd_sgemm_fn f, int act, size_t batch, const sagd_matrix *a,
                           const int32_t *cols, size_t n_cols, const sagd_tensor *W,
                           const sagd_tensor *b, float *z, size_t ldz, float *out, size_t ldo,
                           size_t tile_rows, float *scratch, size_t slots)
{
    forward_job j = {0};
    j.gemm = f, j.act = act, j.batch = batch, j.tile = tile_rows;
    j.slot = sagd_forward_slot(W->fmt, b ? b->fmt : SAGD_FP32, tile_rows, W->cols,
                               cols != NULL);
    j.a = a, j.cols = cols, j.n_cols = n_cols;
    j.W = W, j.b = b, j.z = z, j.out = out, j.ldz = ldz, j.ldo = ldo;
    j.scratch = scratch;
    if (batch == 0)
        return 0;
    sagd_parallel_upto((long)((W->rows + tile_rows - 1) / tile_rows), (int)slots, forward_tile,
                       &j);
    return sagd_sum_partials(j.bad);
}

/* ---------------------------------------------------------------- backward */

typedef struct {
    sagd_sgemm_fn gemm;
    size_t batch, tile, slot, n_blocks;
    const sagd_matrix *g, *a;
    const int32_t *cols;
    size_t n_cols;
    float *dA;
    size_t ldA;
    sagd_tensor *W, *b, *mW, *vW, *mb, *vb;
    const sagd_update *uw, *ub;
    float *scratch;
    int64_t bad[SAGD_MAX_THREADS];
} backward_job;

/* dA[:, C] = g @ W[:, C] for one block C of columns, over every tile of rows. */
static void input_gradient_block(void *ctx, long block, int thread)
{
    backward_job *j = (backward_job *)ctx;
    const sagd_tensor *W = j->W;
    const size_t n_in = W->cols, width = (n_in + j->n_blocks - 1) / j->n_blocks;
    const size_t c0 = (size_t)block * width, c1 = c0 + width < n_in ? c0 + width : n_in;
    float *wbuf = j->scratch + (size_t)thread * j->slot;
    size_t r0;
    if (c0 >= c1)
        return;
    for (r0 = 0; r0 < W->rows; r0 += j->tile) {
        const size_t r1 = r0 + j->tile < W->rows ? r0 + j->tile : W->rows;
        sagd_matrix Wt, G = *j->g;
        G.p = at(j->g, 0, r0);
        if (W->fmt == SAGD_FP32) {
            Wt = rows_of((float *)row_of(W, r0) + c0, (int)n_in);
        } else {
            sagd_tensor_decode(W, r0, r1, c0, c1, wbuf, c1 - c0);
            Wt = rows_of(wbuf, (int)(c1 - c0));
        }
        gemm(j->gemm, 0, &G, 0, &Wt, (int)j->batch, (int)(c1 - c0), (int)(r1 - r0), 1.0f,
             r0 == 0 ? 0.0f : 1.0f, j->dA + c0, (int)j->ldA);
    }
}

static void column_sums(const sagd_matrix *g, size_t rows, size_t c0, size_t cols, float *out)
{
    size_t r, c;
    if (!g->colmajor) {
        sagd_column_sums(rows, cols, at(g, 0, c0), (size_t)g->ld, out);
        return;
    }
    for (c = 0; c < cols; c++) {
        float s = 0.0f;
        for (r = 0; r < rows; r++)
            s += *at(g, r, c0 + c);
        out[c] = s;
    }
}

/* The weight gradient of one tile of rows, and the fused update of the tile. */
static void update_tile(void *ctx, long tile, int thread)
{
    backward_job *j = (backward_job *)ctx;
    sagd_tensor *W = j->W;
    const size_t n_in = W->cols, r0 = (size_t)tile * j->tile;
    const size_t r1 = r0 + j->tile < W->rows ? r0 + j->tile : W->rows;
    float *gbuf = j->scratch + (size_t)thread * j->slot;
    float *dbbuf = gbuf + j->tile * n_in, *wbuf = dbbuf + j->tile;
    sagd_matrix G = *j->g;
    int64_t bad;
    G.p = at(j->g, 0, r0);
    if (j->cols) {
        gemm(j->gemm, 1, &G, 0, j->a, (int)(r1 - r0), (int)j->n_cols, (int)j->batch, 1.0f,
             0.0f, packed_block(gbuf, r1 - r0, n_in, j->n_cols), (int)j->n_cols);
        spread_columns(gbuf, r1 - r0, n_in, j->cols, j->n_cols);
    } else {
        gemm(j->gemm, 1, &G, 0, j->a, (int)(r1 - r0), (int)n_in, (int)j->batch, 1.0f, 0.0f,
             gbuf, (int)n_in);
    }
    bad = sagd_update_rows(j->uw, W, r0, r1, wbuf, gbuf, j->mW, j->vW);
    if (j->b != NULL) {
        column_sums(j->g, j->batch, r0, r1 - r0, dbbuf);
        bad += sagd_update_rows(j->ub, j->b, r0, r1, NULL, dbbuf, j->mb, j->vb);
    }
    j->bad[thread] += bad;
}

int64_t sagd_dense_backward(sagd_sgemm_fn f, size_t batch, const sagd_matrix *g,
                            const sagd_matrix *a, const int32_t *cols, size_t n_cols,
                            float *dA, size_t ldA, sagd_tensor *W,
                            sagd_tensor *b, sagd_tensor *mW, sagd_tensor *vW, sagd_tensor *mb,
                            sagd_tensor *vb, const sagd_update *uw, const sagd_update *ub,
                            size_t tile_rows, float *scratch, size_t slots)
{
    backward_job j = {0};
    const int threads = sagd_get_threads();
    j.gemm = f, j.batch = batch, j.tile = tile_rows;
    j.slot = sagd_backward_slot(W->fmt, b ? b->fmt : SAGD_FP32, tile_rows, W->cols);
    j.g = g, j.a = a, j.cols = cols, j.n_cols = n_cols, j.dA = dA, j.ldA = ldA;
    j.W = W, j.b = b, j.mW = mW, j.vW = vW, j.mb = mb, j.vb = vb, j.uw = uw, j.ub = ub;
    j.scratch = scratch;
    if (cols != NULL && dA != NULL)
        return -1;
    if (batch == 0)
        return 0;
    if (dA != NULL) { /* before any weight changes */
        j.n_blocks = (size_t)(threads < (int)slots ? threads : (int)slots);
        if (j.n_blocks < 1)
            j.n_blocks = 1;
        sagd_parallel_upto((long)j.n_blocks, (int)slots, input_gradient_block, &j);
    }
    sagd_parallel_upto((long)((W->rows + tile_rows - 1) / tile_rows), (int)slots, update_tile,
                       &j);
    return sagd_sum_partials(j.bad);
}
