"""One dense layer over tiles of rows: forward, dA / dW / db, and the fused update, against
float64 numpy, for every format and activation, tile sizes that do and do not divide the
matrix, and C-ordered, F-ordered and strided inputs."""
import tracemalloc

import numpy as np
import pytest

from sagd import _kernels
from sagd.formats import FORMATS, bias_format, new_tensor

from . import oracle

ACTS = ["identity", "relu", "tanh", "sigmoid", "gelu"]
TILES = [1, 3, 5, 13, 64]          # the layer has 13 rows: 5 does not divide it
LAYOUTS = ["C", "F", "rows-strided", "both-strided"]
B, N_IN, N_OUT = 9, 11, 13


def layout(x, kind):
    """x (float32) in the memory layout `kind`, equal in value."""
    if kind == "C":
        return np.ascontiguousarray(x)
    if kind == "F":
        return np.asfortranarray(x)
    big = np.zeros((2 * x.shape[0], x.shape[1] + 3), np.float32)
    if kind == "rows-strided":      # every other row of a wider array: unit column stride
        big[::2, 1:1 + x.shape[1]] = x
        return big[::2, 1:1 + x.shape[1]]
    big = np.zeros((x.shape[0], 2 * x.shape[1]), np.float32, order="F")
    big[:, ::2] = x                 # no unit stride at all: the layer copies it for BLAS
    return big[:, ::2]


def make_layer(fmt, seed=0, tensor_id=0):
    rng = np.random.default_rng(seed)
    W = new_tensor(fmt, (N_OUT, N_IN), tensor_id)
    W.assign(rng.standard_normal((N_OUT, N_IN)).astype(np.float32) * 0.5, stochastic=False)
    b = new_tensor(bias_format(fmt), (N_OUT,), tensor_id + 1)
    b.assign(rng.standard_normal(N_OUT).astype(np.float32) * 0.1, stochastic=False)
    return W, b


def forward(a, W, b, act, tile):
    z = np.empty((a.shape[0], W.rows), np.float32)
    out = np.empty_like(z)
    scratch = np.empty(_kernels.forward_scratch_size(W.format, b.format, tile, W.cols),
                       np.float32)
    _kernels.dense_forward(_kernels.as_blas_operand(a), W, b, z, out, act, tile, scratch)
    return z, out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_forward_matches_float64(fmt, act, tile, kind):
    W, b = make_layer(fmt)
    a = np.random.default_rng(1).standard_normal((B, N_IN)).astype(np.float32)
    z, out = forward(layout(a, kind), W, b, act, tile)
    z_ref, out_ref = oracle.dense_forward(a, W.to_float(), b.to_float(), act)
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)


def backward(g, a, W, b, tile, step=None, want_dA=True, states="fp32", kind="sgd"):
    """Run dense_backward with SGD momentum (its state after one step is the gradient)."""
    step = step or _kernels.Step("sgd", lr=0.1, momentum=0.9, stochastic=False)
    mW = new_tensor(states, (W.rows, W.cols), 10)
    mb = new_tensor(states, (W.rows,), 11)
    vW = new_tensor(states, (W.rows, W.cols), 12) if kind == "adam" else None
    vb = new_tensor(states, (W.rows,), 13) if kind == "adam" else None
    dA = np.empty((g.shape[0], W.cols), np.float32) if want_dA else None
    scratch = np.empty(_kernels.backward_scratch_size(W.format, b.format, tile, W.cols),
                       np.float32)
    bad = _kernels.dense_backward(_kernels.as_blas_operand(g), _kernels.as_blas_operand(a), dA,
                                  W, b, mW, vW, mb, vb, step, tile, scratch)
    return dA, mW, mb, vW, vb, bad


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_backward_gradients_match_float64(fmt, tile, kind):
    W, b = make_layer(fmt, seed=2)
    W_before = W.to_float()
    rng = np.random.default_rng(3)
    a = rng.standard_normal((B, N_IN)).astype(np.float32)
    g = rng.standard_normal((B, N_OUT)).astype(np.float32)
    dA, mW, mb, _, _, bad = backward(layout(g, kind), layout(a, kind), W, b, tile)
    assert bad == 0
    g64, a64 = g.astype(np.float64), a.astype(np.float64)
    # dA uses the weights as they were before this step's update
    np.testing.assert_allclose(dA, g64 @ W_before, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mW.to_float(), g64.T @ a64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mb.to_float(), g64.sum(axis=0), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(W.to_float(), W_before), "the step must change the weights"


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_update_rounds_the_fp32_step_once(fmt):
    """Nearest rounding: the stored weight is exactly round(w - lr * dW) of the fp32 math."""
    W, b = make_layer(fmt, seed=4)
    w0 = W.to_float()
    rng = np.random.default_rng(5)
    a = rng.standard_normal((B, N_IN)).astype(np.float32)
    g = rng.standard_normal((B, N_OUT)).astype(np.float32)
    _, mW, _, _, _, _ = backward(g, a, W, b, tile=5)
    expected = w0 - np.float32(0.1) * mW.to_float()      # same fp32 operations
    want = np.empty(expected.size, np.uint16)
    _kernels.encode(expected.reshape(-1), want, fmt, stochastic=False)
    assert np.array_equal(W.codes.reshape(-1), want)


def test_fp32_layer_step_matches_sgd_oracle():
    W, b = make_layer("fp32", seed=6)
    w0, b0 = W.to_float(), b.to_float()
    rng = np.random.default_rng(7)
    a = rng.standard_normal((B, N_IN)).astype(np.float32)
    g = rng.standard_normal((B, N_OUT)).astype(np.float32)
    backward(g, a, W, b, tile=4)
    w_ref, _ = oracle.sgd(w0, [g.T.astype(np.float64) @ a], lr=0.1, momentum=0.9)
    b_ref, _ = oracle.sgd(b0, [g.sum(axis=0)], lr=0.1, momentum=0.9)
    np.testing.assert_allclose(W.to_float(), w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.to_float(), b_ref, rtol=1e-5, atol=1e-6)


def adam_step_results(fmt, a, g, tile):
    W, b = make_layer(fmt, seed=9)
    step = _kernels.Step("adam", lr=0.01, seed=123, stochastic=True)
    dA, mW, mb, vW, vb, _ = backward(g, a, W, b, tile, step=step, states="bf16", kind="adam")
    return W, [W.codes.copy(), b.codes.copy(), mW.codes.copy(), vW.codes.copy(),
               mb.codes.copy(), dA]


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_bits_do_not_depend_on_threads_or_simd(fmt):
    """With stochastic rounding, weights, bf16 states and dA come out bit-identical whatever
    the thread count and SIMD implementation: each element's random bits and fp32 update
    depend on that element only."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((B, N_IN)).astype(np.float32)
    g = rng.standard_normal((B, N_OUT)).astype(np.float32)
    threads, simd = _kernels.get_num_threads(), _kernels.current_simd()
    results = []
    try:
        for n_threads in (1, 2, 3):
            for level in _kernels.simd_available():
                _kernels.set_num_threads(n_threads)
                _kernels.use_simd(level)
                results.append(adam_step_results(fmt, a, g, tile=5)[1])
    finally:
        _kernels.set_num_threads(threads)
        _kernels.use_simd(simd)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_agrees_across_tile_sizes(fmt):
    """Across tile sizes BLAS may sum dW and dA in another order (fp32 rounding differs
    in the last bit), so a stochastic rounding decision can flip: weights agree to one
    step of the format's grid, and almost all bit for bit."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((B, N_IN)).astype(np.float32)
    g = rng.standard_normal((B, N_OUT)).astype(np.float32)
    runs = [adam_step_results(fmt, a, g, tile) for tile in TILES]
    W0 = runs[0][0].to_float()
    grid = {"fp32": 1e-6, "bf16": 2.0**-7, "fp16": 2.0**-10}.get(fmt)
    for W, res in runs[1:]:
        w = W.to_float()
        if fmt == "int8":
            tol = 1.01 * np.maximum(W.scales, runs[0][0].scales)[:, None]
        else:
            tol = grid * np.maximum(np.abs(W0), 1e-3)
        assert np.all(np.abs(w - W0) <= tol)
        if fmt != "fp32":   # fp32 keeps every last-bit difference of the sums
            assert np.mean(w == W0) > 0.95
        np.testing.assert_allclose(res[-1], runs[0][1][-1], rtol=1e-5, atol=1e-6)


def test_backward_allocates_no_buffer_the_size_of_W():
    n_in, n_out, batch, tile = 512, 512, 32, 16
    W = new_tensor("bf16", (n_out, n_in), 0)
    b = new_tensor("bf16", (n_out,), 1)
    m = [new_tensor("bf16", s, i) for i, s in enumerate([(n_out, n_in), (n_out, n_in),
                                                          (n_out,), (n_out,)], start=2)]
    a = np.ones((batch, n_in), np.float32)
    g = np.ones((batch, n_out), np.float32)
    dA = np.empty((batch, n_in), np.float32)
    scratch = np.empty(_kernels.backward_scratch_size("bf16", "bf16", tile, n_in), np.float32)
    step = _kernels.Step("adam", lr=1e-3)
    tracemalloc.start()
    _kernels.dense_backward(g, a, dA, W, b, m[0], m[1], m[2], m[3], step, tile, scratch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 * 1024, f"{peak} bytes allocated during the backward pass"
    assert scratch.nbytes < n_in * n_out * 4 / 8


def test_activation_derivatives_match_finite_differences():
    z = np.linspace(-6, 6, 96, dtype=np.float32).reshape(1, -1)  # 0 (relu's kink) not in it
    for act in ACTS:
        a = np.empty_like(z)
        _kernels.bias_act(act, z.copy(), np.empty(0, np.float32), a)
        d = np.ones_like(z)
        _kernels.act_backward(act, z, a, d)
        want = oracle.activation_grad(z.astype(np.float64), act)
        np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5, err_msg=act)


def test_layer_rejects_mismatched_shapes():
    W, b = make_layer("bf16")
    a = np.zeros((B, N_IN + 1), np.float32)
    with pytest.raises(ValueError, match="12 features, the layer takes 11"):
        forward(a, W, b, "relu", 4)
    with pytest.raises(ValueError, match="scratch holds"):
        _kernels.dense_forward(np.zeros((B, N_IN), np.float32), W, b,
                               np.empty((B, N_OUT), np.float32),
                               np.empty((B, N_OUT), np.float32), "relu", 4,
                               np.empty(3, np.float32))


# ------------------------------------------------------------------ input columns skipped

ZERO_COLS = [0, 3, 4, 10]           # of N_IN = 11: zero in every row of the batch


def input_with_zero_columns(seed):
    a = np.random.default_rng(seed).standard_normal((B, N_IN)).astype(np.float32)
    a[:, ZERO_COLS] = 0.0
    a[0, 3] = -0.0                  # a negative zero adds nothing either
    return a


def test_nonzero_columns_and_packing():
    a = input_with_zero_columns(20)
    idx = np.full(N_IN, -1, np.int32)
    n = _kernels.nonzero_columns(a, idx)
    keep = [c for c in range(N_IN) if c not in ZERO_COLS]
    assert idx[:n].tolist() == keep
    packed = _kernels.pack_columns(a.copy(), idx[:n])
    assert packed.shape == (B, len(keep))
    assert np.array_equal(packed, a[:, keep])
    assert _kernels.nonzero_columns(np.zeros((B, N_IN), np.float32), idx) == 0
    with pytest.raises(ValueError, match="ascending"):
        _kernels.pack_columns(a.copy(), np.array([2, 1], np.int32))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", [1, 5, 13])
def test_forward_on_nonzero_columns_matches_full_input(fmt, tile):
    W, b = make_layer(fmt)
    a = input_with_zero_columns(21)
    cols = np.array([c for c in range(N_IN) if c not in ZERO_COLS], np.int32)
    z = np.empty((B, N_OUT), np.float32)
    out = np.empty_like(z)
    scratch = np.empty(_kernels.forward_scratch_size(fmt, b.format, tile, N_IN, subset=True),
                       np.float32)
    _kernels.dense_forward(np.ascontiguousarray(a[:, cols]), W, b, z, out, "relu", tile,
                           scratch, cols)
    z_ref, out_ref = oracle.dense_forward(a, W.to_float(), b.to_float(), "relu")
    np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n_in, n_cols", [(1024, None), (2048, None), (1030, 1024),
                                          (1030, 1000)])
def test_forward_with_padded_tile_rows(fmt, n_in, n_cols):
    """Tiles of 1024 or 2048 columns are decoded with a longer row stride (fp32 ones too)
    than the weights have: same products, in scratch sized for them, training's included."""
    rng = np.random.default_rng(25)
    W = new_tensor(fmt, (7, n_in), 0)
    W.assign(rng.standard_normal((7, n_in)).astype(np.float32) * 0.1, stochastic=False)
    b = new_tensor(bias_format(fmt), (7,), 1)
    b.assign(rng.standard_normal(7).astype(np.float32), stochastic=False)
    a = rng.standard_normal((5, n_in)).astype(np.float32)
    cols = None
    if n_cols is not None:
        cols = np.sort(rng.choice(n_in, n_cols, replace=False)).astype(np.int32)
        a[:, np.setdiff1d(np.arange(n_in), cols)] = 0.0
    z_ref, _ = oracle.dense_forward(a, W.to_float(), b.to_float(), "identity")
    subset = cols is not None
    forward_size = _kernels.forward_scratch_size(fmt, b.format, 3, n_in, 2, subset=subset)
    training_size = _kernels.backward_scratch_size(fmt, b.format, 3, n_in, 2)
    assert training_size >= forward_size        # a training step's forward keeps 2 threads
    for size in (forward_size, training_size):
        z = np.full((5, 7), np.nan, np.float32)
        x = np.ascontiguousarray(a[:, cols]) if subset else a
        _kernels.dense_forward(x, W, b, z, z, "identity", 3, np.empty(size, np.float32), cols)
        np.testing.assert_allclose(z, z_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tile", [1, 5, 13])
def test_backward_on_nonzero_columns_matches_full_input(fmt, tile):
    """The skipped columns get a zero gradient: Adam moves their weights exactly as the full
    input does, bit for bit; the others agree with the full input's update."""
    a = input_with_zero_columns(22)
    g = np.random.default_rng(23).standard_normal((B, N_OUT)).astype(np.float32)
    cols = np.array([c for c in range(N_IN) if c not in ZERO_COLS], np.int32)
    results = []
    for subset in (False, True):
        W, b = make_layer(fmt, seed=24)
        states = [new_tensor("bf16", s, i) for i, s in enumerate(
            [(N_OUT, N_IN), (N_OUT, N_IN), (N_OUT,), (N_OUT,)], start=10)]
        step = _kernels.Step("adam", lr=0.01, seed=5, stochastic=True)
        scratch = np.empty(_kernels.backward_scratch_size(fmt, b.format, tile, N_IN),
                           np.float32)
        x = np.ascontiguousarray(a[:, cols]) if subset else a
        bad = _kernels.dense_backward(g, x, None, W, b, states[0], states[1], states[2],
                                      states[3], step, tile, scratch, None,
                                      cols if subset else None)
        assert bad == 0
        results.append((W.to_float(), states[0].to_float(), states[1].to_float()))
    (w_full, m_full, v_full), (w_sub, m_sub, v_sub) = results
    assert np.array_equal(w_sub[:, ZERO_COLS], w_full[:, ZERO_COLS])
    assert np.all(m_sub[:, ZERO_COLS] == 0) and np.all(v_sub[:, ZERO_COLS] == 0)
    np.testing.assert_allclose(m_sub, m_full, rtol=2**-7, atol=1e-6)
    np.testing.assert_allclose(v_sub, v_full, rtol=2**-7, atol=1e-9)
    grid = {"fp32": 1e-6, "bf16": 2.0**-7, "fp16": 2.0**-10, "int8": 2.0**-6}[fmt]
    assert np.all(np.abs(w_sub - w_full) <= grid * np.maximum(np.abs(w_full), 1e-2))


def test_columns_subset_rejects_bad_lists_and_dA():
    W, b = make_layer("bf16")
    scratch = np.empty(_kernels.backward_scratch_size("bf16", "bf16", 4, N_IN), np.float32)
    z = np.empty((B, N_OUT), np.float32)
    cols = np.array([1, 2], np.int32)
    with pytest.raises(ValueError, match="input has 3 columns, cols lists 2"):
        _kernels.dense_forward(np.zeros((B, 3), np.float32), W, b, z, z, "relu", 4, scratch,
                               cols)
    with pytest.raises(ValueError, match="ascending column numbers in 0..10"):
        _kernels.dense_forward(np.zeros((B, 2), np.float32), W, b, z, z, "relu", 4, scratch,
                               np.array([1, 11], np.int32))
    step = _kernels.Step("sgd", lr=0.1)
    with pytest.raises(ValueError, match="dA cannot be computed"):
        _kernels.dense_backward(np.zeros((B, N_OUT), np.float32), np.zeros((B, 2), np.float32),
                                np.zeros((B, N_IN), np.float32), W, b, None, None, None, None,
                                step, 4, scratch, None, cols)
