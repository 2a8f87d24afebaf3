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
    int64_t sagd_optim_step(const sagd_optim *opt, int phase, size_t n, const float *w,
                            float *g, void *m, void *v, int state_fmt, const sagd_rng *rng_m,
                            const sagd_rng *rng_v, uint64_t first_elem)
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
    int sagd_openmp_enabled()
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

cdef inline uint32_t stream_id(uint32_t tensor_id, uint32_t micro) noexcept nogil:
    # one stream per tensor and write pass; micro-batch passes of one step differ
    return (tensor_id << 16) | (micro & 0xffff)


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
    cdef readonly int fmt
    cdef readonly Py_ssize_t rows, cols
    cdef public uint32_t tensor_id
    cdef char* data
    cdef float* scale_data

    def __init__(self, codes, str fmt, uint32_t tensor_id, scales=None):
        cdef int f = FORMATS[fmt]
        if not isinstance(codes, np.ndarray) or codes.dtype != CODE_DTYPES[f]:
            raise ValueError(f"{fmt} codes must be a numpy array of {CODE_DTYPES[f]}")
        if codes.ndim not in (1, 2) or codes.size == 0:
            raise ValueError(f"codes must be a non-empty 1-D or 2-D array, got shape "
                             f"{codes.shape}")
        self.codes = codes
        self.fmt = f
        self.tensor_id = tensor_id
        self.rows = codes.shape[0]
        self.cols = codes.shape[1] if codes.ndim == 2 else 1
        self.data = _data_ptr(codes, "codes")
        self.scales = None
        self.scale_data = NULL
        if f == SAGD_INT8:
            if (not isinstance(scales, np.ndarray) or scales.dtype != np.float32
                    or scales.shape != (self.rows,)):
                raise ValueError(f"int8 needs float32 scales of shape ({self.rows},)")
            self.scales = scales
            self.scale_data = <float*>_data_ptr(scales, "scales")
        elif scales is not None:
            raise ValueError(f"{fmt} tensors have no scales")

    @property
    def format(self):
        return {v: k for k, v in FORMATS.items()}[self.fmt]

    @property
    def nbytes(self):
        return self.codes.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    cdef inline char* row(self, Py_ssize_t r) noexcept nogil:
        return self.data + r * self.cols * _code_size(self.fmt)

    cdef inline float scale(self, Py_ssize_t r) noexcept nogil:
        return self.scale_data[r] if self.fmt == SAGD_INT8 else 1.0

    cdef void decode_rows(self, Py_ssize_t r0, Py_ssize_t r1, float* out) noexcept nogil:
        cdef Py_ssize_t r
        if self.fmt == SAGD_INT8:
            for r in range(r0, r1):
                sagd_decode(self.fmt, self.row(r), self.cols, self.scale_data[r],
                            out + (r - r0) * self.cols)
        else:
            sagd_decode(self.fmt, self.row(r0), (r1 - r0) * self.cols, 1.0, out)

    cdef int64_t write_rows(self, Py_ssize_t r0, Py_ssize_t r1, const float* x,
                            const sagd_rng* rng) noexcept nogil:
        """Round rows r0..r1-1 from x. An int8 row gets a new scale when it has outgrown
        its range or uses less than half of it."""
        cdef Py_ssize_t r, c
        cdef int64_t bad = 0
        cdef float mx, v, sc
        cdef const float* xr
        if self.fmt != SAGD_INT8:
            return sagd_encode(self.fmt, x, (r1 - r0) * self.cols, self.row(r0), 1.0, rng,
                               r0 * self.cols)
        for r in range(r0, r1):
            xr = x + (r - r0) * self.cols
            mx = 0.0
            for c in range(self.cols):
                v = xr[c] if xr[c] >= 0 else -xr[c]
                mx = v if v > mx else mx   # NaN never wins this comparison
            sc = self.scale_data[r]
            if not sc > 0:
                sc = self.scale_data[r] = 1.0
            if mx > 0 and mx < 3.0e38 and (mx > 127.0 * sc or mx < 63.5 * sc):
                self.scale_data[r] = mx / 127.0
            bad += sagd_encode(self.fmt, xr, self.cols, self.row(r), self.scale_data[r], rng,
                               r * self.cols)
        return bad

    def to_float(self):
        """The fp32 values, as a new array shaped like codes."""
        out = np.empty(self.codes.shape, dtype=np.float32)
        cdef float[::1] o = out.reshape(-1)
        with nogil:
            self.decode_rows(0, self.rows, &o[0])
        return out

    def assign(self, x, bint stochastic=True, uint64_t seed=0, uint64_t step=0,
               uint32_t micro=0, Py_ssize_t r0=0):
        """Round rows r0 .. r0 + len(x) - 1 from fp32 values x; returns the non-finite count.
        int8 rows are given the scale max|row| / 127 when they fit their old one badly."""
        cdef const float[:, ::1] xv = np.ascontiguousarray(x, dtype=np.float32).reshape(
            -1, self.cols)
        cdef Py_ssize_t r1 = r0 + xv.shape[0]
        if r0 < 0 or r1 > self.rows or xv.shape[0] == 0:
            raise ValueError(f"rows {r0}..{r1} are outside 0..{self.rows}")
        cdef sagd_rng r = make_rng(seed, stream_id(self.tensor_id, micro), step)
        cdef int64_t bad
        with nogil:
            bad = self.write_rows(r0, r1, &xv[0, 0], &r if stochastic else NULL)
        return bad


# ------------------------------------------------------------------ one optimizer step

cdef class Step:
    """What one pass of the optimizer does: its numbers for this step (learning rate, bias
    corrections, micro-batch factors), the phase, and where its random bits come from."""
    cdef sagd_optim opt
    cdef public int phase
    cdef public uint64_t seed, step
    cdef public uint32_t micro
    cdef public bint stochastic

    def __init__(self, str kind="adam", float lr=1e-3, float momentum=0.0, bint nesterov=False,
                 float beta1=0.9, float beta2=0.999, float eps=1e-8, float l2=0.0,
                 float decay=0.0, uint64_t seed=0, bint stochastic=True):
        if kind not in ("sgd", "adam"):
            raise ValueError(f"kind must be 'sgd' or 'adam', got {kind!r}")
        self.opt.kind = SAGD_ADAM if kind == "adam" else SAGD_SGD
        self.opt.nesterov = nesterov
        self.opt.lr = lr
        self.opt.momentum = momentum
        self.opt.beta1 = beta1
        self.opt.beta2 = beta2
        self.opt.eps = eps
        self.opt.l2 = l2
        self.opt.decay = decay
        self.opt.bc1 = 1.0
        self.opt.bc2 = 1.0
        self.opt.vscale = 1.0
        self.opt.gscale = 1.0
        self.phase = SAGD_BEGIN | SAGD_APPLY
        self.seed = seed
        self.step = 1
        self.micro = 0
        self.stochastic = stochastic

    @property
    def lr(self):
        return self.opt.lr

    @lr.setter
    def lr(self, float v):
        self.opt.lr = v

    @property
    def bc1(self):
        return self.opt.bc1

    @bc1.setter
    def bc1(self, float v):
        self.opt.bc1 = v

    @property
    def bc2(self):
        return self.opt.bc2

    @bc2.setter
    def bc2(self, float v):
        self.opt.bc2 = v

    @property
    def vscale(self):
        return self.opt.vscale

    @vscale.setter
    def vscale(self, float v):
        self.opt.vscale = v

    @property
    def gscale(self):
        return self.opt.gscale

    @gscale.setter
    def gscale(self, float v):
        self.opt.gscale = v

    @property
    def beta1(self):
        return self.opt.beta1

    @property
    def beta2(self):
        return self.opt.beta2

    @property
    def begins(self):
        return bool(self.phase & SAGD_BEGIN)

    @property
    def applies(self):
        return bool(self.phase & SAGD_APPLY)

    def set_phase(self, bint begin, bint apply):
        self.phase = (SAGD_BEGIN if begin else 0) | (SAGD_APPLY if apply else 0)

    cdef int64_t update(self, Stored p, Py_ssize_t r0, Py_ssize_t r1, const float* w, float* g,
                        Stored m, Stored v) noexcept nogil:
        """The fused update of rows r0..r1-1 of p: states in place, new weights rounded
        into p. w: the rows' current fp32 values; g: their gradient (clobbered)."""
        cdef size_t n = (r1 - r0) * p.cols
        cdef sagd_rng rm, rv, rp
        cdef int64_t bad
        cdef int sfmt = m.fmt if m is not None else SAGD_FP32
        cdef int phase = self.phase
        if m is None:  # plain SGD applies every pass
            phase = phase | SAGD_APPLY
        if m is not None:
            rm = make_rng(self.seed, stream_id(m.tensor_id, self.micro), self.step)
        if v is not None:
            rv = make_rng(self.seed, stream_id(v.tensor_id, self.micro), self.step)
        bad = sagd_optim_step(&self.opt, phase, n, w, g,
                              m.row(r0) if m is not None else NULL,
                              v.row(r0) if v is not None else NULL, sfmt,
                              &rm if self.stochastic and m is not None else NULL,
                              &rv if self.stochastic and v is not None else NULL,
                              r0 * p.cols)
        if phase & SAGD_APPLY:
            rp = make_rng(self.seed, stream_id(p.tensor_id, self.micro), self.step)
            bad += p.write_rows(r0, r1, g, &rp if self.stochastic else NULL)
        return bad


def optim_step(Step s, Stored p, float[::1] w, float[::1] g, Stored m=None, Stored v=None,
               Py_ssize_t r0=0):
    """The fused update of rows r0.. of p (w: their fp32 values, g: gradient, clobbered)
    with s; returns the count of non-finite results that were not stored."""
    if w.shape[0] != g.shape[0] or w.shape[0] % p.cols or w.shape[0] == 0:
        raise ValueError("w and g must hold the same whole number of rows of p")
    cdef Py_ssize_t r1 = r0 + w.shape[0] // p.cols
    if r1 > p.rows or r0 < 0:
        raise ValueError(f"rows {r0}..{r1} are outside 0..{p.rows}")
    for name, st in (("m", m), ("v", v)):
        if st is not None and (st.rows != p.rows or st.cols != p.cols):
            raise ValueError(f"state {name} has shape ({st.rows}, {st.cols}), "
                             f"the tensor ({p.rows}, {p.cols})")
    if s.opt.kind == SAGD_ADAM and (m is None or v is None):
        raise ValueError("adam needs both states m and v")
    cdef int64_t bad
    with nogil:
        bad = s.update(p, r0, r1, &w[0], &g[0], m, v)
    return bad


# ------------------------------------------------------------------ dense layers

cdef struct Operand:
    float* p     # first element
    int ld       # leading dimension, in elements
    bint colmajor  # True when memory holds the matrix column by column (F order)


cdef Operand _operand(const float[:, :] x, str name) except *:
    cdef Operand o
    cdef Py_ssize_t s0 = x.strides[0] // 4, s1 = x.strides[1] // 4
    if x.strides[0] % 4 or x.strides[1] % 4:
        raise ValueError(f"{name} is not aligned to whole float32 elements")
    o.p = <float*>&x[0, 0]
    if s1 == 1 and s0 >= max(x.shape[1], 1):
        o.ld, o.colmajor = max(s0, 1), False
    elif s0 == 1 and s1 >= max(x.shape[0], 1):
        o.ld, o.colmajor = max(s1, 1), True
    else:
        raise ValueError(f"{name} must have one unit stride (C or F order) for BLAS")
    return o


cdef inline float* _at(Operand o, Py_ssize_t r, Py_ssize_t c) noexcept nogil:
    return o.p + (c * o.ld + r if o.colmajor else r * o.ld + c)


cdef inline void _gemm(bint ta, Operand A, bint tb, Operand B, int m, int n, int k,
                       float alpha, float beta, float* C, int ldc) noexcept nogil:
    """Row-major C (m x n) = alpha * op(A) @ op(B) + beta * C, op(X) = X^T when t is set.
    BLAS is column-major, so it computes C^T = op(B)^T op(A)^T: operands swap."""
    cdef char ca = b'T' if (ta ^ A.colmajor) else b'N'
    cdef char cb = b'T' if (tb ^ B.colmajor) else b'N'
    sgemm(&cb, &ca, &n, &m, &k, &alpha, B.p, &B.ld, A.p, &A.ld, &beta, C, &ldc)


def as_blas_operand(x):
    """x as float32 with a unit stride in one dimension (a view when it already is)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and (x.strides[1] == 4 or x.strides[0] == 4) and x.size:
        return x
    return np.ascontiguousarray(x)


def forward_scratch_size(str fmt, str bias_fmt, Py_ssize_t tile_rows, Py_ssize_t n_in):
    """Floats of scratch dense_forward needs for one tile."""
    return ((tile_rows * n_in if fmt != "fp32" else 0)
            + (tile_rows if bias_fmt != "fp32" else 0))


def backward_scratch_size(str fmt, str bias_fmt, Py_ssize_t tile_rows, Py_ssize_t n_in):
    """Floats of scratch dense_backward needs for one tile: the decoded weights (not for
    fp32), the weight gradient, the bias gradient and the decoded biases (not for fp32)."""
    return tile_rows * n_in + tile_rows + forward_scratch_size(fmt, bias_fmt, tile_rows, n_in)


cdef void _check_layer(Stored W, Stored b) except *:
    if b is not None and (b.rows != W.rows or b.cols != 1):
        raise ValueError(f"bias has shape ({b.rows}, {b.cols}), expected ({W.rows},)")


def dense_forward(const float[:, :] a, Stored W, Stored b, float[:, ::1] z, float[:, ::1] out,
                  str activation, Py_ssize_t tile_rows, float[::1] scratch):
    """out = act(z), z = a @ W^T + b, W read tile_rows rows at a time (decoded into scratch).
    out may be z itself (not for gelu, whose backward needs z). Returns the number of z
    that are NaN, infinite or beyond 2^64 in magnitude (0 unless the layer overflowed)."""
    cdef int act = ACTIVATIONS[activation]
    cdef Py_ssize_t B = a.shape[0], n_in = W.cols, n_out = W.rows, r0, r1, T
    T = min(max(tile_rows, 1), n_out)
    _check_layer(W, b)
    if a.shape[1] != n_in:
        raise ValueError(f"input has {a.shape[1]} features, the layer takes {n_in}")
    if z.shape[0] != B or z.shape[1] != n_out or out.shape[0] != B or out.shape[1] != n_out:
        raise ValueError(f"z and out must have shape ({B}, {n_out})")
    need = forward_scratch_size(W.format, b.format if b is not None else "fp32", T, n_in)
    if scratch.shape[0] < need:
        raise ValueError(f"scratch holds {scratch.shape[0]} floats, {need} needed")
    if B == 0:
        return 0
    cdef Operand A = _operand(a, "a"), Wt
    cdef int64_t bad = 0
    cdef float* wbuf = &scratch[0] if scratch.shape[0] else NULL
    cdef float* bbuf = wbuf + (T * n_in if W.fmt != SAGD_FP32 else 0)
    cdef float* bias
    cdef int ldz = z.strides[0] // 4, ldo = out.strides[0] // 4
    Wt.ld = n_in
    Wt.colmajor = False
    with nogil:
        r0 = 0
        while r0 < n_out:
            r1 = min(n_out, r0 + T)
            if W.fmt == SAGD_FP32:
                Wt.p = <float*>W.row(r0)
            else:
                W.decode_rows(r0, r1, wbuf)
                Wt.p = wbuf
            _gemm(False, A, True, Wt, B, r1 - r0, n_in, 1.0, 0.0, &z[0, r0], ldz)
            bias = NULL
            if b is not None:
                if b.fmt == SAGD_FP32:
                    bias = <float*>b.row(r0)
                else:
                    b.decode_rows(r0, r1, bbuf)
                    bias = bbuf
            bad += sagd_bias_act(act, B, r1 - r0, bias, &z[0, r0], ldz, &out[0, r0], ldo)
            r0 = r1
    return bad


def dense_backward(const float[:, :] g, const float[:, :] a, dA, Stored W, Stored b,
                   Stored mW, Stored vW, Stored mb, Stored vb, Step step,
                   Py_ssize_t tile_rows, float[::1] scratch, Step bias_step=None):
    """Backward pass of z = a @ W^T + b and the fused update, tile_rows rows of W at a time.

    g: dL/dz (B x n_out); a: the layer input (B x n_in); dA: None, or a float32 (B x n_in)
    C-contiguous array that receives dL/da = g @ W, computed with the weights before this
    step's update. For each tile R: W[R] is decoded, dA += g[:, R] @ W[R], dW = g[:, R]^T a
    and db = sum of g[:, R] go to scratch, then the optimizer updates the states and (when
    the step applies) rounds the new weights into W[R]. No buffer the size of W exists.
    bias_step (default: step) updates the biases, e.g. without weight decay.
    Returns the number of elements whose update was not finite (and was not stored).
    """
    if bias_step is None:
        bias_step = step
    cdef Py_ssize_t B = g.shape[0], n_in = W.cols, n_out = W.rows, r0, r1, T
    T = min(max(tile_rows, 1), n_out)
    _check_layer(W, b)
    if g.shape[1] != n_out or a.shape[0] != B or a.shape[1] != n_in:
        raise ValueError(f"g must be ({B}, {n_out}) and a ({B}, {n_in}); got "
                         f"({g.shape[0]}, {g.shape[1]}) and ({a.shape[0]}, {a.shape[1]})")
    for name, st, p in (("mW", mW, W), ("vW", vW, W), ("mb", mb, b), ("vb", vb, b)):
        if st is not None and (p is None or st.rows != p.rows or st.cols != p.cols):
            raise ValueError(f"state {name} does not match its tensor")
    if step.opt.kind == SAGD_ADAM and (mW is None or vW is None
                                       or (b is not None and (mb is None or vb is None))):
        raise ValueError("adam needs states m and v for every tensor")
    need = backward_scratch_size(W.format, b.format if b is not None else "fp32", T, n_in)
    if scratch.shape[0] < need:
        raise ValueError(f"scratch holds {scratch.shape[0]} floats, {need} needed")
    cdef float[:, ::1] dAv
    cdef float* dAp = NULL
    cdef int ldA = 0
    if dA is not None:
        dAv = dA
        if dAv.shape[0] != B or dAv.shape[1] != n_in:
            raise ValueError(f"dA must have shape ({B}, {n_in})")
        if B:
            dAp = &dAv[0, 0]
            ldA = dAv.strides[0] // 4
    if B == 0:
        return 0
    cdef Operand G = _operand(g, "g"), A = _operand(a, "a"), Wt, Gt
    cdef float* gbuf = &scratch[0]
    cdef float* dbbuf = gbuf + T * n_in
    cdef float* wbuf = dbbuf + T
    cdef float* bbuf = wbuf + (T * n_in if W.fmt != SAGD_FP32 else 0)
    cdef float* bias
    cdef int64_t bad = 0
    Wt.ld = n_in
    Wt.colmajor = False
    with nogil:
        r0 = 0
        while r0 < n_out:
            r1 = min(n_out, r0 + T)
            if W.fmt == SAGD_FP32:
                Wt.p = <float*>W.row(r0)
            else:
                W.decode_rows(r0, r1, wbuf)
                Wt.p = wbuf
            Gt = G
            Gt.p = _at(G, 0, r0)
            if dAp != NULL:
                _gemm(False, Gt, False, Wt, B, n_in, r1 - r0, 1.0, 0.0 if r0 == 0 else 1.0,
                      dAp, ldA)
            _gemm(True, Gt, False, A, r1 - r0, n_in, B, 1.0, 0.0, gbuf, n_in)
            bad += step.update(W, r0, r1, Wt.p, gbuf, mW, vW)
            if b is not None:
                _column_sums(Gt, B, r1 - r0, dbbuf)
                if b.fmt == SAGD_FP32:
                    bias = <float*>b.row(r0)
                else:
                    b.decode_rows(r0, r1, bbuf)
                    bias = bbuf
                bad += bias_step.update(b, r0, r1, bias, dbbuf, mb, vb)
            r0 = r1
    return bad


cdef void _column_sums(Operand G, Py_ssize_t rows, Py_ssize_t cols, float* out) noexcept nogil:
    cdef Py_ssize_t r, c
    if not G.colmajor:
        sagd_column_sums(rows, cols, G.p, G.ld, out)
        return
    for c in range(cols):
        out[c] = 0.0
        for r in range(rows):
            out[c] += G.p[c * G.ld + r]


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
    with nogil:
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


# the best implementation this CPU offers, unless SAGD_SIMD names one
def _select_default_simd():
    import os
    wanted = os.environ.get("SAGD_SIMD", "").strip().lower()
    if wanted:
        use_simd(wanted)
    else:
        sagd_simd_select(SAGD_SIMD_AVX2)


sagd_threads_init()
_select_default_simd()
