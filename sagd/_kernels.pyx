"""Thin Cython layer over kernels/: typed memoryviews in, nogil calls into the C kernels
and BLAS sgemm (through scipy.linalg.cython_blas), errors raised after the nogil block.

It knows about tensors in storage formats and about one dense layer's forward pass and
its tiled backward pass with the fused update; it knows nothing of batches, epochs or
models.
"""
import numpy as np

from libc.stdint cimport (int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t,
                          uint64_t)
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport sgemm


cdef extern from "threads.h" nogil:
    enum:
        SAGD_MAX_THREADS


cdef extern from "sagd_kernels.h" nogil:
    enum:
        SAGD_FP32, SAGD_BF16, SAGD_FP16, SAGD_INT8
        SAGD_SGD, SAGD_ADAM
        SAGD_BEGIN, SAGD_APPLY
        SAGD_IDENTITY, SAGD_RELU, SAGD_TANH, SAGD_SIGMOID, SAGD_GELU
        SAGD_SIMD_GENERIC, SAGD_SIMD_AVX2

    ctypedef struct sagd_rng:
        uint64_t seed
        uint64_t step
        uint32_t stream

    ctypedef struct sagd_optim:
        int kind
        int nesterov
        float lr, momentum, beta1, beta2, eps, l2, decay, bc1, bc2, vscale, gscale

    void sagd_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out)
    void sagd_random_words(const sagd_rng *rng, uint64_t first_word, size_t n, uint32_t *out)
    void sagd_uniform(const sagd_rng *rng, uint64_t first_word, size_t n, float lo, float hi,
                      float *out)
    int64_t sagd_encode(int fmt, const float *x, size_t n, void *out, float scale,
                        const sagd_rng *rng, uint64_t first_elem)
    void sagd_decode(int fmt, const void *inp, size_t n, float scale, float *out)
    ctypedef struct sagd_stored:
        void *data
        int fmt
        float scale
        const sagd_rng *rng

    ctypedef struct sagd_tensor:
        void *data
        int fmt
        float *scales
        size_t rows, cols
        uint32_t id

    ctypedef struct sagd_update:
        sagd_optim opt
        int phase
        uint64_t seed, step
        uint32_t micro
        int stochastic

    ctypedef void (*sagd_sgemm_fn)(char *, char *, int *, int *, int *, float *, float *, int *,
                                   float *, int *, float *, float *, int *)

    ctypedef struct sagd_matrix:
        float *p
        int ld
        int colmajor

    void sagd_tensor_decode(const sagd_tensor *t, size_t r0, size_t r1, size_t c0, size_t c1,
                            float *out, size_t ldo)
    size_t sagd_nonzero_columns(size_t rows, size_t cols, const float *x, size_t ld,
                                int32_t *idx)
    void sagd_pack_columns(size_t rows, float *x, size_t ld, const int32_t *idx, size_t n)
    int64_t sagd_tensor_write(sagd_tensor *t, size_t r0, size_t r1, const float *x,
                              const sagd_rng *rng)
    int64_t sagd_update_rows(const sagd_update *u, sagd_tensor *p, size_t r0, size_t r1,
                             float *decoded, float *g, sagd_tensor *m, sagd_tensor *v)
    size_t sagd_forward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in, int subset)
    size_t sagd_backward_slot(int wfmt, int bfmt, size_t tile_rows, size_t n_in)
    int64_t sagd_dense_forward(sagd_sgemm_fn gemm, int act, size_t batch, const sagd_matrix *a,
                               const int32_t *cols, size_t n_cols, const sagd_tensor *W,
                               const sagd_tensor *b, float *z, size_t ldz, float *out,
                               size_t ldo, size_t tile_rows, float *scratch, size_t slots)
    int64_t sagd_dense_backward(sagd_sgemm_fn gemm, size_t batch, const sagd_matrix *g,
                                const sagd_matrix *a, const int32_t *cols, size_t n_cols,
                                float *dA, size_t ldA, sagd_tensor *W,
                                sagd_tensor *b, sagd_tensor *mW, sagd_tensor *vW,
                                sagd_tensor *mb, sagd_tensor *vb, const sagd_update *uw,
                                const sagd_update *ub, size_t tile_rows, float *scratch,
                                size_t slots)

    int64_t sagd_optim_step(const sagd_optim *opt, int phase, size_t n, const sagd_stored *w,
                            float *g, const sagd_stored *m, const sagd_stored *v,
                            uint64_t first_elem)
    int64_t sagd_bias_act(int act, size_t rows, size_t cols, const float *b, float *z,
                          size_t ldz, float *a, size_t lda)
    void sagd_act_backward(int act, size_t rows, size_t cols, const float *z, const float *a,
                           size_t ld, float *d, size_t ldd)
    void sagd_column_sums(size_t rows, size_t cols, const float *g, size_t ldg, float *db)
    double sagd_softmax_xent(size_t rows, size_t k, float *z, size_t ldz, const int32_t *y,
                             const float *w, float scale, int grad)
    double sagd_sigmoid_xent(size_t rows, float *z, size_t ldz, const int32_t *y,
                             const float *w, float scale, int grad)
    double sagd_squared_error(size_t rows, size_t k, float *z, size_t ldz, const float *y,
                              size_t ldy, const float *w, float scale, int grad)
    void sagd_softmax(size_t rows, size_t k, float *z, size_t ldz)
    void sagd_sigmoid(size_t n, float *z)
    void sagd_permute(uint64_t n, uint64_t seed, uint32_t round, const int64_t *inp,
                      size_t count, int64_t *out)
    int sagd_simd_available(int level)
    int sagd_simd_select(int level)
    int sagd_simd_current()
    void sagd_threads_init()
    void sagd_set_threads(int n)
    int sagd_get_threads()


FORMATS = {"fp32": SAGD_FP32, "bf16": SAGD_BF16, "fp16": SAGD_FP16, "int8": SAGD_INT8}
CODE_DTYPES = {SAGD_FP32: np.dtype(np.float32), SAGD_BF16: np.dtype(np.uint16),
               SAGD_FP16: np.dtype(np.uint16), SAGD_INT8: np.dtype(np.int8)}
ACTIVATIONS = {"identity": SAGD_IDENTITY, "relu": SAGD_RELU, "tanh": SAGD_TANH,
               "sigmoid": SAGD_SIGMOID, "gelu": SAGD_GELU}
SIMD_LEVELS = {"generic": SAGD_SIMD_GENERIC, "avx2": SAGD_SIMD_AVX2}


# ------------------------------------------------------------------ machine

def simd_available():
    """Names of the kernel implementations this CPU and build can run."""
    return [name for name, level in SIMD_LEVELS.items() if sagd_simd_available(level)]


def use_simd(name):
    """Run the hot kernels with implementation `name` ("generic" or "avx2")."""
    if name not in SIMD_LEVELS or not sagd_simd_available(SIMD_LEVELS[name]):
        raise ValueError(f"SIMD level {name!r} is not available here; "
                         f"available: {simd_available()}")
    sagd_simd_select(SIMD_LEVELS[name])


def current_simd():
    return {v: k for k, v in SIMD_LEVELS.items()}[sagd_simd_current()]


def set_num_threads(int n):
    """Threads for sagd's own kernels (BLAS keeps its own setting); n <= 0: all."""
    sagd_set_threads(n)


def get_num_threads():
    return sagd_get_threads()


# ------------------------------------------------------------------ random bits

def philox4x32_10(counter, key):
    """One Philox4x32-10 block: 4 counter words and 2 key words in, 4 words out."""
    cdef uint32_t c[4]
    cdef uint32_t k[2]
    cdef uint32_t out[4]
    cdef int i
    for i in range(4):
        c[i] = counter[i]
    for i in range(2):
        k[i] = key[i]
    sagd_philox4x32_10(c, k, out)
    return tuple(out[i] for i in range(4))


cdef inline sagd_rng make_rng(uint64_t seed, uint32_t stream, uint64_t step) noexcept nogil:
    cdef sagd_rng r
    r.seed = seed
    r.stream = stream
    r.step = step
    return r


def random_words(uint64_t seed, uint32_t stream, uint64_t step, uint64_t first_word, size_t n):
    """Words first_word .. first_word + n - 1 of the stream (seed, stream, step)."""
    out = np.empty(n, dtype=np.uint32)
    cdef uint32_t[::1] o = out
    cdef sagd_rng r = make_rng(seed, stream, step)
    if n:
        with nogil:
            sagd_random_words(&r, first_word, n, &o[0])
    return out


def uniform_fill(float[::1] out, float lo, float hi, uint64_t seed, uint32_t stream,
                 uint64_t step=0, uint64_t first_word=0):
    """Fill out with floats uniform in [lo, hi] from the stream (seed, stream, step)."""
    cdef sagd_rng r = make_rng(seed, stream, step)
    if out.shape[0]:
        with nogil:
            sagd_uniform(&r, first_word, out.shape[0], lo, hi, &out[0])


def permute(uint64_t n, uint64_t seed, uint32_t round, int64_t[::1] idx):
    """In place: idx[j] = perm(idx[j]), perm the permutation of [0, n) keyed by
    (seed, round). Every index must lie in [0, n)."""
    cdef Py_ssize_t j
    for j in range(idx.shape[0]):
        if idx[j] < 0 or <uint64_t>idx[j] >= n:
            raise ValueError(f"index {idx[j]} is outside 0..{n - 1}")
    if idx.shape[0]:
        with nogil:
            sagd_permute(n, seed, round, &idx[0], idx.shape[0], &idx[0])


# ------------------------------------------------------------------ formats

cdef inline size_t _code_size(int fmt) noexcept nogil:
    return 4 if fmt == SAGD_FP32 else (1 if fmt == SAGD_INT8 else 2)


cdef char* _data_ptr(object arr, str name) except NULL:
    """Address of a C-contiguous, writeable, non-empty numpy array's first byte."""
    if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or not arr.flags.writeable:
        raise ValueError(f"{name} must be a writeable C-contiguous numpy array")
    cdef uint8_t[::1] view = arr.reshape(-1).view(np.uint8)
    return <char*>&view[0]


def encode(const float[::1] x, codes, str fmt, float scale=1.0, bint stochastic=True,
           uint64_t seed=0, uint32_t stream=0, uint64_t step=0, uint64_t first_elem=0):
    """Round x into `codes` (1-D, the format's code dtype); returns the non-finite count."""
    cdef int f = FORMATS[fmt]
    if codes.dtype != CODE_DTYPES[f] or codes.ndim != 1 or codes.shape[0] != x.shape[0]:
        raise ValueError(f"codes must be 1-D {CODE_DTYPES[f]} of length {x.shape[0]}")
    if f == SAGD_INT8 and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"int8 needs a positive finite scale, got {scale}")
    if x.shape[0] == 0:
        return 0
    cdef char* out = _data_ptr(codes, "codes")
    cdef sagd_rng r = make_rng(seed, stream, step)
    cdef int64_t bad
    with nogil:
        bad = sagd_encode(f, &x[0], x.shape[0], out, scale, &r if stochastic else NULL,
                          first_elem)
    return bad


def decode(codes, str fmt, float scale, float[::1] out):
    """The fp32 values of 1-D codes, into out."""
    cdef int f = FORMATS[fmt]
    if codes.dtype != CODE_DTYPES[f] or codes.ndim != 1 or codes.shape[0] != out.shape[0]:
        raise ValueError(f"codes must be 1-D {CODE_DTYPES[f]} of length {out.shape[0]}")
    if out.shape[0] == 0:
        return
    codes = np.ascontiguousarray(codes)
    cdef const uint8_t[::1] raw = codes.view(np.uint8)
    with nogil:
        sagd_decode(f, &raw[0], out.shape[0], scale, &out[0])


cdef class Stored:
    """A tensor kept in a storage format.

    codes: C-contiguous array of shape (rows,) or (rows, cols) in the format's code dtype
    (float32, uint16 for bf16/fp16, int8); scales: float32 (rows,) for int8, else None.
    Element (r, c) has index r * cols + c, which selects its random bits.
    """
    cdef readonly object codes
    cdef readonly object scales
    cdef sagd_tensor t

    def __init__(self, codes, str fmt, uint32_t tensor_id, scales=None):
        cdef int f = FORMATS[fmt]
        if not isinstance(codes, np.ndarray) or codes.dtype != CODE_DTYPES[f]:
            raise ValueError(f"{fmt} codes must be a numpy array of {CODE_DTYPES[f]}")
        if codes.ndim not in (1, 2) or codes.size == 0:
            raise ValueError(f"codes must be a non-empty 1-D or 2-D array, got shape "
                             f"{codes.shape}")
        self.codes = codes
        self.t.fmt = f
        self.t.id = tensor_id
        self.t.rows = codes.shape[0]
        self.t.cols = codes.shape[1] if codes.ndim == 2 else 1
        self.t.data = _data_ptr(codes, "codes")
        self.scales = None
        self.t.scales = NULL
        if f == SAGD_INT8:
            if (not isinstance(scales, np.ndarray) or scales.dtype != np.float32
                    or scales.shape != (self.t.rows,)):
                raise ValueError(f"int8 needs float32 scales of shape ({self.t.rows},)")
            self.scales = scales
            self.t.scales = <float*>_data_ptr(scales, "scales")
        elif scales is not None:
            raise ValueError(f"{fmt} tensors have no scales")

    @property
    def format(self):
        return {v: k for k, v in FORMATS.items()}[self.t.fmt]

    @property
    def fmt(self):
        return self.t.fmt

    @property
    def rows(self):
        return self.t.rows

    @property
    def cols(self):
        return self.t.cols

    @property
    def tensor_id(self):
        return self.t.id

    @property
    def nbytes(self):
        return self.codes.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    def to_float(self):
        """The fp32 values, as a new array shaped like codes."""
        out = np.empty(self.codes.shape, dtype=np.float32)
        cdef float[::1] o = out.reshape(-1)
        with nogil:
            sagd_tensor_decode(&self.t, 0, self.t.rows, 0, self.t.cols, &o[0], self.t.cols)
        return out

    def assign(self, x, bint stochastic=True, uint64_t seed=0, uint64_t step=0,
               uint32_t micro=0, Py_ssize_t r0=0):
        """Round rows r0 .. r0 + len(x) - 1 from fp32 values x; returns the non-finite count.
        int8 rows are given the scale max|row| / 127 when they fit their old one badly."""
        cdef const float[:, ::1] xv = np.ascontiguousarray(x, dtype=np.float32).reshape(
            -1, self.t.cols)
        cdef Py_ssize_t r1 = r0 + xv.shape[0]
        if r0 < 0 or r1 > <Py_ssize_t>self.t.rows or xv.shape[0] == 0:
            raise ValueError(f"rows {r0}..{r1} are outside 0..{self.t.rows}")
        cdef sagd_rng r = make_rng(seed, (self.t.id << 16) | (micro & 0xffff), step)
        cdef int64_t bad
        with nogil:
            bad = sagd_tensor_write(&self.t, r0, r1, &xv[0, 0], &r if stochastic else NULL)
        return bad


cdef sagd_tensor* _tensor(Stored s) noexcept:
    return &s.t if s is not None else NULL


# ------------------------------------------------------------------ one optimizer step

cdef class Step:
    """What one pass of the optimizer does: its numbers for this step (learning rate, bias
    corrections, micro-batch factors), the phase, and where its random bits come from."""
    cdef sagd_update u

    def __init__(self, str kind="adam", float lr=1e-3, float momentum=0.0, bint nesterov=False,
                 float beta1=0.9, float beta2=0.999, float eps=1e-8, float l2=0.0,
                 float decay=0.0, uint64_t seed=0, bint stochastic=True):
        if kind not in ("sgd", "adam"):
            raise ValueError(f"kind must be 'sgd' or 'adam', got {kind!r}")
        self.u.opt.kind = SAGD_ADAM if kind == "adam" else SAGD_SGD
        self.u.opt.nesterov = nesterov
        self.u.opt.lr = lr
        self.u.opt.momentum = momentum
        self.u.opt.beta1 = beta1
        self.u.opt.beta2 = beta2
        self.u.opt.eps = eps
        self.u.opt.l2 = l2
        self.u.opt.decay = decay
        self.u.opt.bc1 = 1.0
        self.u.opt.bc2 = 1.0
        self.u.opt.vscale = 1.0
        self.u.opt.gscale = 1.0
        self.u.phase = SAGD_BEGIN | SAGD_APPLY
        self.u.seed = seed
        self.u.step = 1
        self.u.micro = 0
        self.u.stochastic = stochastic

    @property
    def lr(self):
        return self.u.opt.lr

    @lr.setter
    def lr(self, float v):
        self.u.opt.lr = v

    @property
    def bc1(self):
        return self.u.opt.bc1

    @bc1.setter
    def bc1(self, float v):
        self.u.opt.bc1 = v

    @property
    def bc2(self):
        return self.u.opt.bc2

    @bc2.setter
    def bc2(self, float v):
        self.u.opt.bc2 = v

    @property
    def vscale(self):
        return self.u.opt.vscale

    @vscale.setter
    def vscale(self, float v):
        self.u.opt.vscale = v

    @property
    def gscale(self):
        return self.u.opt.gscale

    @gscale.setter
    def gscale(self, float v):
        self.u.opt.gscale = v

    @property
    def beta1(self):
        return self.u.opt.beta1

    @property
    def beta2(self):
        return self.u.opt.beta2

    @property
    def step(self):
        return self.u.step

    @step.setter
    def step(self, uint64_t v):
        self.u.step = v

    @property
    def micro(self):
        return self.u.micro

    @micro.setter
    def micro(self, uint32_t v):
        self.u.micro = v

    @property
    def stochastic(self):
        return bool(self.u.stochastic)

    def set_phase(self, bint begin, bint apply):
        self.u.phase = (SAGD_BEGIN if begin else 0) | (SAGD_APPLY if apply else 0)


def optim_step(Step s, Stored p, float[::1] g, Stored m=None, Stored v=None,
               Py_ssize_t r0=0):
    """The fused update of rows r0.. of p (g: their gradient, clobbered) with s; returns
    the count of non-finite results that were not stored."""
    if g.shape[0] % p.t.cols or g.shape[0] == 0:
        raise ValueError("g must hold a whole number of rows of p")
    cdef Py_ssize_t r1 = r0 + g.shape[0] // p.t.cols
    if r1 > <Py_ssize_t>p.t.rows or r0 < 0:
        raise ValueError(f"rows {r0}..{r1} are outside 0..{p.t.rows}")
    for name, st in (("m", m), ("v", v)):
        if st is not None and (st.rows != p.rows or st.cols != p.cols):
            raise ValueError(f"state {name} has shape ({st.rows}, {st.cols}), "
                             f"the tensor ({p.rows}, {p.cols})")
    if s.u.opt.kind == SAGD_ADAM and (m is None or v is None):
        raise ValueError("adam needs both states m and v")
    cdef float[::1] decoded = np.empty(g.shape[0], np.float32)
    cdef sagd_tensor* tm = _tensor(m)
    cdef sagd_tensor* tv = _tensor(v)
    cdef int64_t bad
    with nogil:
        bad = sagd_update_rows(&s.u, &p.t, r0, r1, &decoded[0], &g[0], tm, tv)
    return bad


# ------------------------------------------------------------------ dense layers

cdef sagd_matrix _matrix(const float[:, :] x, str name) except *:
    """A BLAS view of x: it needs one unit stride (C or F order)."""
    cdef sagd_matrix o
    cdef Py_ssize_t s0 = x.strides[0] // 4, s1 = x.strides[1] // 4
    if x.strides[0] % 4 or x.strides[1] % 4:
        raise ValueError(f"{name} is not aligned to whole float32 elements")
    o.p = <float*>&x[0, 0]
    if s1 == 1 and s0 >= max(x.shape[1], 1):
        o.ld, o.colmajor = max(s0, 1), 0
    elif s0 == 1 and s1 >= max(x.shape[0], 1):
        o.ld, o.colmajor = max(s1, 1), 1
    else:
        raise ValueError(f"{name} must have one unit stride (C or F order) for BLAS")
    return o


def as_blas_operand(x):
    """x as float32 with a unit stride in one dimension (a view when it already is)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and (x.strides[1] == 4 or x.strides[0] == 4) and x.size:
        return x
    return np.ascontiguousarray(x)


def forward_scratch_size(str fmt, str bias_fmt, Py_ssize_t tile_rows, Py_ssize_t n_in,
                         Py_ssize_t slots=1, bint subset=False):
    """Floats of scratch dense_forward needs to run tiles of tile_rows rows on `slots`
    threads at once (each thread decodes its tile; with subset, a subset of its columns,
    which fp32 weights need room for too)."""
    return slots * sagd_forward_slot(FORMATS[fmt], FORMATS[bias_fmt], tile_rows, n_in, subset)


def backward_scratch_size(str fmt, str bias_fmt, Py_ssize_t tile_rows, Py_ssize_t n_in,
                          Py_ssize_t slots=1):
    """Floats of scratch dense_backward needs per `slots` threads: each thread's weight
    gradient tile, bias gradient, and decoded tile (not for fp32)."""
    return slots * sagd_backward_slot(FORMATS[fmt], FORMATS[bias_fmt], tile_rows, n_in)


cdef Py_ssize_t _slots(Py_ssize_t have, size_t per_slot, str what) except -1:
    if per_slot == 0:
        return SAGD_MAX_THREADS
    if have < <Py_ssize_t>per_slot:
        raise ValueError(f"scratch holds {have} floats, {per_slot} needed ({what})")
    return have // per_slot


cdef void _check_layer(Stored W, Stored b) except *:
    if b is not None and (b.t.rows != W.t.rows or b.t.cols != 1):
        raise ValueError(f"bias has shape ({b.rows}, {b.cols}), expected ({W.rows},)")


def nonzero_columns(const float[:, ::1] x, int32_t[::1] idx):
    """The columns of x holding a value other than +-0 go to idx[:n], ascending; returns n."""
    if idx.shape[0] < x.shape[1]:
        raise ValueError(f"idx has room for {idx.shape[0]} columns, x has {x.shape[1]}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        return 0
    cdef size_t n
    with nogil:
        n = sagd_nonzero_columns(x.shape[0], x.shape[1], &x[0, 0], x.strides[0] // 4, &idx[0])
    return n


def pack_columns(x, const int32_t[::1] cols):
    """In place: rows of the C-contiguous 2-D float32 array x keep only the columns cols
    (ascending). Returns the packed (rows, len(cols)) view of x's memory."""
    cdef float[:, ::1] xv = x
    cdef Py_ssize_t n = cols.shape[0], rows = xv.shape[0]
    _check_columns(cols, xv.shape[1])
    if rows and n:
        with nogil:
            sagd_pack_columns(rows, &xv[0, 0], xv.shape[1], &cols[0], n)
    return x.reshape(-1)[: rows * n].reshape(rows, n)


cdef void _check_columns(const int32_t[::1] cols, Py_ssize_t n_in) except *:
    cdef Py_ssize_t j
    if cols.shape[0] == 0 or cols.shape[0] > n_in:
        raise ValueError(f"cols must list 1 to {n_in} columns, got {cols.shape[0]}")
    for j in range(cols.shape[0]):
        if cols[j] < 0 or cols[j] >= n_in or (j and cols[j] <= cols[j - 1]):
            raise ValueError(f"cols must be ascending column numbers in 0..{n_in - 1}; "
                             f"cols[{j}] = {cols[j]}")


def dense_forward(const float[:, :] a, Stored W, Stored b, float[:, ::1] z, float[:, ::1] out,
                  str activation, Py_ssize_t tile_rows, float[::1] scratch,
                  const int32_t[::1] cols=None):
    """out = act(z), z = a @ W^T + b, W read tile_rows rows at a time (decoded into
    scratch). With cols, a holds only the layer's input columns cols (the others are zero),
    and the products skip the rest. Tiles run in parallel on as many threads as scratch has
    room for (forward_scratch_size). out may be z itself (not for gelu, whose backward
    needs z). Returns the number of z that are NaN, infinite or beyond 2^64 in magnitude."""
    cdef int act = ACTIVATIONS[activation]
    cdef Py_ssize_t B = a.shape[0], n_in = W.t.cols, n_out = W.t.rows, T
    T = min(max(tile_rows, 1), n_out)
    _check_layer(W, b)
    if cols is not None:
        _check_columns(cols, n_in)
        if a.shape[1] != cols.shape[0]:
            raise ValueError(f"input has {a.shape[1]} columns, cols lists {cols.shape[0]}")
    elif a.shape[1] != n_in:
        raise ValueError(f"input has {a.shape[1]} features, the layer takes {n_in}")
    if z.shape[0] != B or z.shape[1] != n_out or out.shape[0] != B or out.shape[1] != n_out:
        raise ValueError(f"z and out must have shape ({B}, {n_out})")
    cdef size_t per = sagd_forward_slot(W.t.fmt, b.t.fmt if b is not None else SAGD_FP32, T,
                                        n_in, cols is not None)
    cdef Py_ssize_t slots = _slots(scratch.shape[0], per, "dense_forward")
    if B == 0:
        return 0
    cdef sagd_matrix A = _matrix(a, "a")
    cdef float* sp = &scratch[0] if scratch.shape[0] else NULL
    cdef sagd_tensor* tb = _tensor(b)
    cdef const int32_t* cp = &cols[0] if cols is not None else NULL
    cdef size_t n_cols = cols.shape[0] if cols is not None else 0
    cdef int64_t bad
    with nogil:
        bad = sagd_dense_forward(<sagd_sgemm_fn>sgemm, act, B, &A, cp, n_cols, &W.t, tb,
                                 &z[0, 0], z.strides[0] // 4, &out[0, 0], out.strides[0] // 4,
                                 T, sp, slots)
    return bad


def dense_backward(const float[:, :] g, const float[:, :] a, dA, Stored W, Stored b,
                   Stored mW, Stored vW, Stored mb, Stored vb, Step step,
                   Py_ssize_t tile_rows, float[::1] scratch, Step bias_step=None,
                   const int32_t[::1] cols=None):
    """Backward pass of z = a @ W^T + b and the fused update, tile_rows rows of W at a time.

    g: dL/dz (B x n_out); a: the layer input (B x n_in); dA: None, or a float32 (B x n_in)
    C-contiguous array that receives dL/da = g @ W, computed with the weights before this
    step's update. Then for each tile R: dW = g[:, R]^T a and db = sum of g[:, R] go to
    scratch, and the optimizer updates the states and (when the step applies) rounds the
    new weights into W[R]. No buffer the size of W exists. Tiles run in parallel on as
    many threads as scratch has room for (backward_scratch_size). bias_step (default:
    step) updates the biases, e.g. without weight decay. With cols (as in dense_forward),
    a holds only those input columns: the other columns' weight gradient is zero, and dA
    cannot be asked for. Returns the number of elements whose update was not finite (and
    was not stored).
    """
    if bias_step is None:
        bias_step = step
    cdef Py_ssize_t B = g.shape[0], n_in = W.t.cols, n_out = W.t.rows, T
    cdef Py_ssize_t width = n_in
    T = min(max(tile_rows, 1), n_out)
    _check_layer(W, b)
    if cols is not None:
        _check_columns(cols, n_in)
        width = cols.shape[0]
        if dA is not None:
            raise ValueError("dA cannot be computed from a subset of the input columns")
    if g.shape[1] != n_out or a.shape[0] != B or a.shape[1] != width:
        raise ValueError(f"g must be ({B}, {n_out}) and a ({B}, {width}); got "
                         f"({g.shape[0]}, {g.shape[1]}) and ({a.shape[0]}, {a.shape[1]})")
    for name, st, p in (("mW", mW, W), ("vW", vW, W), ("mb", mb, b), ("vb", vb, b)):
        if st is not None and (p is None or st.rows != p.rows or st.cols != p.cols):
            raise ValueError(f"state {name} does not match its tensor")
    if step.u.opt.kind == SAGD_ADAM and (mW is None or vW is None
                                         or (b is not None and (mb is None or vb is None))):
        raise ValueError("adam needs states m and v for every tensor")
    cdef size_t per = sagd_backward_slot(W.t.fmt, b.t.fmt if b is not None else SAGD_FP32, T,
                                         n_in)
    cdef Py_ssize_t slots = _slots(scratch.shape[0], per, "dense_backward")
    cdef float[:, ::1] dAv
    cdef float* dAp = NULL
    cdef Py_ssize_t ldA = 0
    if dA is not None:
        dAv = dA
        if dAv.shape[0] != B or dAv.shape[1] != n_in:
            raise ValueError(f"dA must have shape ({B}, {n_in})")
        if B:
            dAp = &dAv[0, 0]
            ldA = dAv.strides[0] // 4
    if B == 0:
        return 0
    cdef sagd_matrix G = _matrix(g, "g"), A = _matrix(a, "a")
    cdef sagd_tensor *tb = _tensor(b), *tmW = _tensor(mW), *tvW = _tensor(vW)
    cdef sagd_tensor *tmb = _tensor(mb), *tvb = _tensor(vb)
    cdef const int32_t* cp = &cols[0] if cols is not None else NULL
    cdef size_t n_cols = cols.shape[0] if cols is not None else 0
    cdef int64_t bad
    with nogil:
        bad = sagd_dense_backward(<sagd_sgemm_fn>sgemm, B, &G, &A, cp, n_cols, dAp, ldA, &W.t,
                                  tb, tmW, tvW, tmb, tvb, &step.u, &bias_step.u, T,
                                  &scratch[0], slots)
    return bad


def bias_act(str activation, float[:, ::1] z, float[::1] b, float[:, ::1] out):
    """out = act(z + b), z += b (b may be empty for no bias)."""
    if z.shape[0] != out.shape[0] or z.shape[1] != out.shape[1]:
        raise ValueError("z and out must have the same shape")
    if b.shape[0] not in (0, z.shape[1]):
        raise ValueError(f"b must have {z.shape[1]} entries")
    cdef int act = ACTIVATIONS[activation]
    if z.shape[0] == 0 or z.shape[1] == 0:
        return
    with nogil:
        sagd_bias_act(act, z.shape[0], z.shape[1],
                      &b[0] if b.shape[0] else NULL, &z[0, 0], z.strides[0] // 4,
                      &out[0, 0], out.strides[0] // 4)


def act_backward(str activation, const float[:, ::1] z, const float[:, ::1] a,
                 float[:, ::1] d):
    """d *= act'(z), given a = act(z) (gelu uses z, the others a)."""
    if not (z.shape[0] == a.shape[0] == d.shape[0] and z.shape[1] == a.shape[1] == d.shape[1]):
        raise ValueError("z, a and d must have the same shape")
    if z.strides[0] != a.strides[0]:
        raise ValueError("z and a must have the same row stride")
    cdef int act = ACTIVATIONS[activation]
    if d.shape[0] == 0 or d.shape[1] == 0:
        return
    with nogil:
        sagd_act_backward(act, d.shape[0], d.shape[1], &z[0, 0], &a[0, 0],
                          z.strides[0] // 4, &d[0, 0], d.strides[0] // 4)


# ------------------------------------------------------------------ losses

def _weights_ptr_check(w, Py_ssize_t rows):
    if w is not None and (w.shape[0] != rows):
        raise ValueError(f"sample weights must have {rows} entries")


def softmax_xent(float[:, ::1] z, const int32_t[::1] y, const float[::1] w=None,
                 float scale=1.0, bint grad=True):
    """Sum of w_i * cross-entropy(softmax(z_i), y_i); z becomes w_i * scale * (p_i - onehot)."""
    cdef Py_ssize_t n = z.shape[0], k = z.shape[1], i
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} rows")
    _weights_ptr_check(w, n)
    for i in range(n):
        if y[i] < 0 or y[i] >= k:
            raise ValueError(f"label code {y[i]} at row {i} is outside 0..{k - 1}")
    if n == 0:
        return 0.0
    cdef double s
    with nogil:
        s = sagd_softmax_xent(n, k, &z[0, 0], z.strides[0] // 4, &y[0],
                              &w[0] if w is not None else NULL, scale, grad)
    return s


def sigmoid_xent(float[:, ::1] z, const int32_t[::1] y, const float[::1] w=None,
                 float scale=1.0, bint grad=True):
    """Binary cross-entropy of sigmoid(z[:, 0]) against y in {0, 1}; gradient into z."""
    cdef Py_ssize_t n = z.shape[0]
    if y.shape[0] != n or z.shape[1] != 1:
        raise ValueError("z must be (n, 1) and y (n,)")
    _weights_ptr_check(w, n)
    if n == 0:
        return 0.0
    cdef double s
    with nogil:
        s = sagd_sigmoid_xent(n, &z[0, 0], z.strides[0] // 4, &y[0],
                              &w[0] if w is not None else NULL, scale, grad)
    return s


def squared_error(float[:, ::1] z, const float[:, ::1] y, const float[::1] w=None,
                  float scale=1.0, bint grad=True):
    """Sum of w_i * 0.5 * |z_i - y_i|^2; z becomes w_i * scale * (z_i - y_i)."""
    cdef Py_ssize_t n = z.shape[0], k = z.shape[1]
    if y.shape[0] != n or y.shape[1] != k:
        raise ValueError(f"y must have shape ({n}, {k})")
    _weights_ptr_check(w, n)
    if n == 0:
        return 0.0
    cdef double s
    with nogil:
        s = sagd_squared_error(n, k, &z[0, 0], z.strides[0] // 4, &y[0, 0], y.strides[0] // 4,
                               &w[0] if w is not None else NULL, scale, grad)
    return s


def softmax(float[:, ::1] z):
    """Rows of z become probabilities, in place."""
    if z.shape[0] and z.shape[1]:
        with nogil:
            sagd_softmax(z.shape[0], z.shape[1], &z[0, 0], z.strides[0] // 4)


def sigmoid(float[::1] z):
    if z.shape[0]:
        with nogil:
            sagd_sigmoid(z.shape[0], &z[0])


# ------------------------------------------------------------------ data

ctypedef fused feature_t:
    double
    float
    int64_t
    int32_t
    int16_t
    int8_t
    uint64_t
    uint32_t
    uint16_t
    uint8_t



def gather_rows(const feature_t[:, :] X, const int64_t[::1] idx, float[:, ::1] out):
    """out[j] = X[idx[j]] as float32, for any strides of X (C, F, views, memmaps)."""
    cdef Py_ssize_t n = idx.shape[0], d = X.shape[1], j, c, i
    if out.shape[0] < n or out.shape[1] != d:
        raise ValueError(f"out must hold ({n}, {d})")
    for j in range(n):
        if idx[j] < 0 or idx[j] >= X.shape[0]:
            raise IndexError(f"row {idx[j]} is outside 0..{X.shape[0] - 1}")
    cdef const feature_t* row
    cdef float* o
    with nogil:
        if d and X.strides[1] == sizeof(feature_t):     # rows contiguous: a loop the C
            for j in range(n):                          # compiler vectorizes
                row = &X[idx[j], 0]
                o = &out[j, 0]
                for c in range(d):
                    o[c] = <float>row[c]
        else:
            for j in range(n):
                i = idx[j]
                for c in range(d):
                    out[j, c] = <float>X[i, c]


ctypedef fused index_t:
    int32_t
    int64_t


def gather_csr(const feature_t[::1] data, const index_t[::1] indices,
               const index_t[::1] indptr, Py_ssize_t n_cols, const int64_t[::1] idx,
               float[:, ::1] out):
    """out[j] = row idx[j] of the CSR matrix (data, indices, indptr) as dense float32,
    without allocating anything."""
    cdef Py_ssize_t n = idx.shape[0], j, k, r, n_rows = indptr.shape[0] - 1
    if out.shape[0] < n or out.shape[1] != n_cols:
        raise ValueError(f"out must hold ({n}, {n_cols})")
    for j in range(n):
        if idx[j] < 0 or idx[j] >= n_rows:
            raise IndexError(f"row {idx[j]} is outside 0..{n_rows - 1}")
    with nogil:
        for j in range(n):
            r = idx[j]
            for k in range(n_cols):
                out[j, k] = 0
            for k in range(indptr[r], indptr[r + 1]):
                out[j, indices[k]] += <float>data[k]
    return None


def gather_rows_fp16(const uint16_t[:, :] X, const int64_t[::1] idx, float[:, ::1] out):
    """gather_rows for float16 X (given as its uint16 bits)."""
    cdef Py_ssize_t n = idx.shape[0], d = X.shape[1], j, c
    if out.shape[0] < n or out.shape[1] != d:
        raise ValueError(f"out must hold ({n}, {d})")
    for j in range(n):
        if idx[j] < 0 or idx[j] >= X.shape[0]:
            raise IndexError(f"row {idx[j]} is outside 0..{X.shape[0] - 1}")
    cdef uint16_t h
    with nogil:
        for j in range(n):
            for c in range(d):
                h = X[idx[j], c]
                sagd_decode(SAGD_FP16, &h, 1, 1.0, &out[j, c])


def first_nonfinite(const float[:, ::1] x):
    """(row, column) of the first NaN or infinity in x, or None."""
    cdef Py_ssize_t r, c, found_r = -1, found_c = -1
    cdef float v
    if x.shape[0] == 0 or x.shape[1] == 0:
        return None
    with nogil:
        for r in range(x.shape[0]):
            for c in range(x.shape[1]):
                v = x[r, c]
                if v != v or v - v != 0:
                    found_r = r
                    found_c = c
                    break
            if found_r >= 0:
                break
    return None if found_r < 0 else (found_r, found_c)


def _configure_from_environment():
    """The best implementation this CPU offers, unless SAGD_SIMD names one; and the thread
    count from SAGD_NUM_THREADS or OMP_NUM_THREADS (process pools such as joblib's set the
    latter for each worker), else one thread per core."""
    import os
    wanted = os.environ.get("SAGD_SIMD", "").strip().lower()
    if wanted:
        use_simd(wanted)
    else:
        sagd_simd_select(SAGD_SIMD_AVX2)
    for var in ("SAGD_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            sagd_set_threads(int(value))
            break


sagd_threads_init()
_configure_from_environment()
