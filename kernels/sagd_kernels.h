/*
 * sagd kernels: the per-element work of training, in portable C99.
 *
 * Nothing here knows about Python. Every function works on one contiguous run of
 * elements (a tile of rows, flattened) and may be called without the GIL. Memory is
 * owned by the caller; no function here allocates anything larger than a few KB of
 * stack.
 */
#ifndef SAGD_KERNELS_H
#define SAGD_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Storage formats of weights and optimizer state. */
enum sagd_format {
    SAGD_FP32 = 0,
    SAGD_BF16 = 1, /* top half of an fp32: 8 exponent bits, 7 fraction bits */
    SAGD_FP16 = 2, /* IEEE binary16 */
    SAGD_INT8 = 3  /* q * scale, q in [-127, 127], one fp32 scale per row */
};

/*
 * Where the random bits of one write come from: a stream of 32-bit words,
 *
 *     word j = Philox4x32-10(counter = (j / 4, stream, step_lo, step_hi), key = seed)[j % 4]
 *
 * Element e of a write takes 16 bits (bf16: half e % 2 of word e / 2, low half first) or
 * 32 bits (fp16, int8: word e). The bits of an element depend only on (seed, stream,
 * step, e): not on how the tensor is cut into tiles or threads.
 * A NULL sagd_rng* means "round to nearest, ties to even".
 */
typedef struct {
    uint64_t seed;
    uint64_t step;
    uint32_t stream;
} sagd_rng;

/* One block of Philox4x32-10 (for tests against the published answers). */
void sagd_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

/* Words first_word .. first_word + n - 1 of the stream of `rng`. */
void sagd_random_words(const sagd_rng *rng, uint64_t first_word, size_t n, uint32_t *out);

/* n floats uniform in [lo, hi) from words first_word.. of the stream (24 bits each). */
void sagd_uniform(const sagd_rng *rng, uint64_t first_word, size_t n, float lo, float hi,
                  float *out);

/*
 * Round n floats to `fmt` and store the codes (float / uint16 / int8, by fmt) in out.
 * first_elem is the index of x[0] within its tensor (it selects the random bits).
 * For SAGD_INT8 the values are q * scale. Stochastic rounding never turns a finite
 * value into inf: it saturates at the largest finite value. Round-to-nearest matches
 * IEEE conversion (fp16 as numpy, bf16 as ml_dtypes), overflow included.
 * Returns the number of non-finite inputs (stored as NaN/inf, or as 0 for int8).
 */
int64_t sagd_encode(int fmt, const float *x, size_t n, void *out, float scale,
                    const sagd_rng *rng, uint64_t first_elem);

/* The fp32 values of n stored codes. */
void sagd_decode(int fmt, const void *in, size_t n, float scale, float *out);

/* Optimizers. */
enum sagd_optimizer { SAGD_SGD = 0, SAGD_ADAM = 1 };

/* Phases of one step: a step over K micro-batches is BEGIN, 0, ..., 0, APPLY (K = 1: both). */
enum sagd_phase { SAGD_BEGIN = 1, SAGD_APPLY = 2 };

typedef struct {
    int kind;          /* sagd_optimizer */
    int nesterov;      /* SGD */
    float lr;
    float momentum;    /* SGD; 0 means no state */
    float beta1, beta2, eps;
    float l2;          /* coupled weight decay: l2 * w is added to the gradient */
    float decay;       /* decoupled weight decay (AdamW): w -= lr * decay * w */
    float bc1, bc2;    /* Adam bias corrections 1 / (1 - beta^t) */
    float vscale;      /* Adam, micro-batching: factor on g^2 (batch weight / micro weight) */
    float gscale;      /* SGD + Nesterov, micro-batching: estimate of g from the last share */
} sagd_optim;

/*
 * n values kept in a storage format: fmt, data (NULL: absent), the scale of int8 values,
 * and the random bits of writes into it (rng NULL: round to nearest).
 */
typedef struct {
    void *data;
    int fmt;
    float scale;
    const sagd_rng *rng;
} sagd_stored;

/*
 * One optimizer step on n elements (a tile, flattened), chunk by chunk (a few hundred
 * elements, which stay in L1): decode the weights and state, update the state, and
 * (phase & APPLY) round the new weights back into w.
 *   w      the weights as stored: fp32, bf16 or fp16. int8 weights are passed decoded,
 *          as an fp32 run that receives the new values; the caller then chooses each
 *          row's scale and rounds the row (sagd_tensor_write).
 *   g      this pass's share of the gradient
 *   m, v   optimizer state (fmt SAGD_FP32 or SAGD_BF16); v only for Adam; m.data NULL for
 *          plain SGD, which applies every pass
 * Math is fp32. A new value that is not finite is never stored: the old one is kept, and
 * the count of such elements is returned.
 */
int64_t sagd_optim_step(const sagd_optim *opt, int phase, size_t n, const sagd_stored *w,
                        float *g, const sagd_stored *m, const sagd_stored *v,
                        uint64_t first_elem);

/* ---------------------------------------------------------------- tensors and layers */

/* A rows x cols tensor kept in a storage format (int8: one scale per row). id selects
   the random bits of writes into it. */
typedef struct {
    void *data;
    int fmt;
    float *scales;
    size_t rows, cols;
    uint32_t id;
} sagd_tensor;

/* One optimizer pass over a tensor: the optimizer's numbers for this step, the phase,
   and the random bits (stream = id << 16 | micro, at step; stochastic 0: nearest). */
typedef struct {
    sagd_optim opt;
    int phase;
    uint64_t seed, step;
    uint32_t micro;
    int stochastic;
} sagd_update;

/* Decode rows r0..r1-1, columns c0..c1-1 of t into out (row stride ldo). */
void sagd_tensor_decode(const sagd_tensor *t, size_t r0, size_t r1, size_t c0, size_t c1,
                        float *out, size_t ldo);
/* Decode rows r0..r1-1 of t at the n columns cols[0..n-1] into out (row stride ldo). */
void sagd_tensor_decode_columns(const sagd_tensor *t, size_t r0, size_t r1,
                                const int32_t *cols, size_t n, float *out, size_t ldo);
/* Round rows r0..r1-1 from x (int8 rows first get a new scale when they fit it badly). */
int64_t sagd_tensor_write(sagd_tensor *t, size_t r0, size_t r1, const float *x,
                          const sagd_rng *rng);
/* The fused update of rows r0..r1-1 of p with gradient g (clobbered); m, v: state or NULL;
   decoded: (r1 - r0) * cols floats of scratch, used by int8 tensors. */
int64_t sagd_update_rows(const sagd_update *u, sagd_tensor *p, size_t r0, size_t r1,
                         float *decoded, float *g, sagd_tensor *m, sagd_tensor *v);

/* BLAS sgemm as reference BLAS declares it: column-major, every argument by address. */
typedef void (*sagd_sgemm_fn)(char *transa, char *transb, int *m, int *n, int *k,
                              float *alpha, float *a, int *lda, float *b, int *ldb,
                              float *beta, float *c, int *ldc);

/* A row-major matrix view: element (r, c) at p[r * ld + c], or p[c * ld + r] when
   colmajor (an F-ordered array). */
typedef struct {
    float *p;
    int ld;
    int colmajor;
} sagd_matrix;

/*
 * Input columns that are zero in a whole batch add nothing to a layer's products: a batch of
 * images with empty borders, one-hot or bag-of-words features. A layer can then be given the
 * batch without them: `a` holds only the input columns cols[0..n_cols-1] (ascending), and
 * the products run over those alone (cols NULL: a holds every column).
 */

/* Columns of x (rows x cols, row stride ld) that hold a value other than +-0, ascending,
   into idx (room for cols entries); returns their count. */
size_t sagd_nonzero_columns(size_t rows, size_t cols, const float *x, size_t ld, int32_t *idx);
/* In place: row r of x (row stride ld) becomes x[r, idx[0..n-1]], the rows n apart. */
void sagd_pack_columns(size_t rows, float *x, size_t ld, const int32_t *idx, size_t n);

/* Floats of scratch one thread needs for a tile of tile_rows rows; subset: the layer reads
   a subset of its input columns (fp32 weights are then gathered into scratch too, as they
   are when a row stride of n_in would slow sgemm down). The backward slot has room for the
   forward pass too: a training step runs both in the same scratch. */
size_t sagd_forward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in, int subset);
size_t sagd_backward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in);

/*
 * out = act(z), z = a @ W^T + b for `batch` rows of a (a: the input columns cols, or all of
 * them); tiles of tile_rows rows of W run in parallel on up to `slots` threads, each with
 * its slot of scratch (sagd_forward_slot). Returns the count of z that overflowed (see
 * sagd_bias_act).
 */
int64_t sagd_dense_forward(sagd_sgemm_fn gemm, int act, size_t batch, const sagd_matrix *a,
                           const int32_t *cols, size_t n_cols, const sagd_tensor *W,
                           const sagd_tensor *b, float *z, size_t ldz, float *out, size_t ldo,
                           size_t tile_rows, float *scratch, size_t slots);

/*
 * Backward pass of z = a @ W^T + b from g = dL/dz, with the fused update of W and b.
 * dA (NULL: not wanted) receives g @ W computed with the weights before the update; it
 * must be NULL when a holds only the columns cols (their weight gradient is computed, the
 * other columns' is zero). uw updates W, ub the biases (e.g. without weight decay).
 * Returns the count of updates that were not finite (and were not stored), or -1 when dA
 * is asked for with cols.
 */
int64_t sagd_dense_backward(sagd_sgemm_fn gemm, size_t batch, const sagd_matrix *g,
                            const sagd_matrix *a, const int32_t *cols, size_t n_cols,
                            float *dA, size_t ldA, sagd_tensor *W,
                            sagd_tensor *b, sagd_tensor *mW, sagd_tensor *vW, sagd_tensor *mb,
                            sagd_tensor *vb, const sagd_update *uw, const sagd_update *ub,
                            size_t tile_rows, float *scratch, size_t slots);

/* Activations. */
enum sagd_activation {
    SAGD_IDENTITY = 0, SAGD_RELU = 1, SAGD_TANH = 2, SAGD_SIGMOID = 3, SAGD_GELU = 4
};

/*
 * z[r, c] += b[c]; a[r, c] = act(z[r, c]) for a rows x cols block (row strides ldz, lda).
 * a may equal z; gelu's backward needs z, so keep z apart from a for gelu.
 * Returns how many z are NaN, infinite, or beyond 2^64 in magnitude (an overflow, or
 * one a step away; relu would hide NaN and -inf).
 */
int64_t sagd_bias_act(int act, size_t rows, size_t cols, const float *b, float *z,
                      size_t ldz, float *a, size_t lda);

/* d[r, c] *= act'(.) given a = act(z) (relu, tanh, sigmoid) or z (gelu). */
void sagd_act_backward(int act, size_t rows, size_t cols, const float *z, const float *a,
                       size_t ld, float *d, size_t ldd);

/* db[c] = sum over rows of g[r, c] (fixed order: deterministic). */
void sagd_column_sums(size_t rows, size_t cols, const float *g, size_t ldg, float *db);

/*
 * Losses, computed stably in fp32 on a block of `rows` samples. Each returns the
 * weighted sum of per-sample losses (sum w_i * l_i, in double) and, when grad != 0,
 * overwrites z with the gradient w_i * scale * dl_i/dz. w may be NULL (all ones).
 */
double sagd_softmax_xent(size_t rows, size_t k, float *z, size_t ldz, const int32_t *y,
                         const float *w, float scale, int grad);
double sagd_sigmoid_xent(size_t rows, float *z, size_t ldz, const int32_t *y, const float *w,
                         float scale, int grad);
double sagd_squared_error(size_t rows, size_t k, float *z, size_t ldz, const float *y,
                          size_t ldy, const float *w, float scale, int grad);

/* In place: rows of z become softmax probabilities (finite, summing to 1). */
void sagd_softmax(size_t rows, size_t k, float *z, size_t ldz);
/* In place: z becomes sigmoid(z). */
void sagd_sigmoid(size_t n, float *z);

/*
 * A keyed pseudo-random permutation of [0, n) that needs no index array:
 * out[j] = perm(in[j]) for indices in [0, n) (in may equal out). Distinct (seed, round)
 * give independent permutations.
 */
void sagd_permute(uint64_t n, uint64_t seed, uint32_t round, const int64_t *in, size_t count,
                  int64_t *out);

/* Implementation selection and threads. */
enum sagd_simd { SAGD_SIMD_GENERIC = 0, SAGD_SIMD_AVX2 = 1 };
int sagd_simd_available(int level);   /* 1 if this CPU and build can run `level` */
int sagd_simd_select(int level);      /* returns the level now in use */
int sagd_simd_current(void);

/* sagd's own threads (BLAS has its own). Call sagd_threads_init once, before any kernel. */
void sagd_threads_init(void);
void sagd_set_threads(int n);         /* <= 0: one per available core */
int sagd_get_threads(void);

#ifdef __cplusplus
}
#endif
#endif /* SAGD_KERNELS_H */
