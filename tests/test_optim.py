"""The fused optimizer update against float64 references: SGD (momentum, Nesterov, weight
decay) and Adam / AdamW, fp32 and bf16 state, micro-batch accumulation, int8 rescaling,
and the refusal to store non-finite values."""
import numpy as np
import pytest

import sagd
from sagd import _kernels
from sagd.formats import new_tensor

from . import oracle

ROWS, COLS = 7, 33
BF16_MAX = float(np.array(0x7F7F0000, np.uint32).view(np.float32))


def tensors(fmt="fp32", states="fp32", adam=True, seed=0):
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    p = new_tensor(fmt, (ROWS, COLS), 0)
    p.assign(w0, stochastic=False)
    m = new_tensor(states, (ROWS, COLS), 1)
    v = new_tensor(states, (ROWS, COLS), 2) if adam else None
    return p, m, v


def grads(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((ROWS, COLS)).astype(np.float32) for _ in range(n)]


def run(step, p, gs, m=None, v=None, adam_bias=True):
    for t, g in enumerate(gs, start=1):
        step.step = t
        if adam_bias:
            step.bc1 = 1 / (1 - step.beta1 ** t)
            step.bc2 = 1 / (1 - step.beta2 ** t)
        bad = _kernels.optim_step(step, p, g.reshape(-1).copy(), m, v)
        assert bad == 0


@pytest.mark.parametrize("l2,decay", [(0.0, 0.0), (0.01, 0.0), (0.0, 0.05)])
def test_adam_and_adamw_match_float64(l2, decay):
    p, m, v = tensors()
    w0 = p.to_float()
    gs = grads(5)
    step = _kernels.Step("adam", lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, l2=l2, decay=decay)
    run(step, p, gs, m, v)
    w, m_ref, v_ref = oracle.adam(w0, gs, 0.01, 0.9, 0.99, 1e-8, l2=l2, decay=decay)
    np.testing.assert_allclose(p.to_float(), w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.to_float(), m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v.to_float(), v_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("momentum,nesterov,l2", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                   (0.9, True, 0.0), (0.5, True, 0.1)])
def test_sgd_matches_float64(momentum, nesterov, l2):
    p, m, _ = tensors(adam=False)
    w0 = p.to_float()
    gs = grads(4)
    step = _kernels.Step("sgd", lr=0.05, momentum=momentum, nesterov=nesterov, l2=l2)
    run(step, p, gs, m if momentum else None, adam_bias=False)
    w, buf = oracle.sgd(w0, gs, 0.05, momentum, nesterov, l2)
    np.testing.assert_allclose(p.to_float(), w, rtol=1e-5, atol=1e-6)
    if momentum:
        np.testing.assert_allclose(m.to_float(), buf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bf16_state_stays_within_bf16_precision_of_fp32(rounding):
    gs = grads(20, seed=3)
    step_kw = dict(lr=0.01, beta1=0.9, beta2=0.99)
    p32, m32, v32 = tensors("fp32", "fp32")
    run(_kernels.Step("adam", **step_kw), p32, gs, m32, v32)
    p16, m16, v16 = tensors("fp32", "bf16")
    run(_kernels.Step("adam", stochastic=(rounding == "stochastic"), seed=4, **step_kw),
        p16, gs, m16, v16)
    # 20 rounded writes of relative error <= 2^-8 each, on moments of size ~|g|
    np.testing.assert_allclose(m16.to_float(), m32.to_float(), atol=20 * 2**-8 * 1.0)
    np.testing.assert_allclose(p16.to_float(), p32.to_float(), atol=20 * 0.01 * 0.05)


def test_equal_micro_batch_shares_give_the_whole_batch_step():
    """K passes with shares g/K (BEGIN, 0.., APPLY) equal one pass with g: exactly for
    the first moment and SGD momentum; for Adam's second moment too when the shares are
    equal (vscale = K)."""
    g = grads(1, seed=5)[0]
    K = 4
    for kind, kw in (("adam", {}), ("sgd", {"momentum": 0.9})):
        whole, mw, vw = tensors(adam=kind == "adam")
        s = _kernels.Step(kind, lr=0.01, **kw)
        s.bc1, s.bc2 = 10.0, 1000.0
        _kernels.optim_step(s, whole, g.reshape(-1).copy(), mw, vw)

        parts, mp, vp = tensors(adam=kind == "adam")
        s = _kernels.Step(kind, lr=0.01, **kw)
        s.bc1, s.bc2, s.vscale = 10.0, 1000.0, float(K)
        for k in range(K):
            s.set_phase(begin=k == 0, apply=k == K - 1)
            s.micro = k
            share = (g / K).reshape(-1).copy()
            _kernels.optim_step(s, parts, share, mp, vp)
        np.testing.assert_allclose(parts.to_float(), whole.to_float(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mp.to_float(), mw.to_float(), rtol=1e-5, atol=1e-7)
        if kind == "adam":
            np.testing.assert_allclose(vp.to_float(), vw.to_float(), rtol=1e-5, atol=1e-9)


def test_non_finite_results_are_never_stored():
    p, m, v = tensors("bf16", "bf16")
    w0, m0, v0 = p.codes.copy(), m.codes.copy(), v.codes.copy()
    g = grads(1)[0]
    g[2, 5] = np.inf
    g[4, 0] = np.nan
    step = _kernels.Step("adam", lr=0.01)
    bad = _kernels.optim_step(step, p, g.reshape(-1).copy(), m, v)
    assert bad == 2
    for now, before in ((p.codes, w0), (m.codes, m0), (v.codes, v0)):
        assert now[2, 5] == before[2, 5] and now[4, 0] == before[4, 0]
        assert np.mean(now != before) > 0.5     # the other elements did move
    assert np.all(np.isfinite(p.to_float()))


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_write_back_rounds_like_the_encoder_with_the_same_bits(fmt):
    """The step's stochastic write-back of weights and state is the format's rounding of
    the fp32 result with the tensor's own stream, bit for bit; at the top of the range
    (bf16) it saturates to the largest finite value instead of overflowing."""
    rng = np.random.default_rng(5)
    top, push = (BF16_MAX, 2e36) if fmt == "bf16" else (65504.0, 2.0)
    w0 = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    w0[0, :4] = top                                 # pushed past the largest finite value
    g = (rng.standard_normal((ROWS, COLS)) * 1e-3).astype(np.float32)
    g[0, :4] = -push              # w + lr * push lies between the largest and inf
    p, m = new_tensor(fmt, (ROWS, COLS), 4), new_tensor("bf16", (ROWS, COLS), 9)
    p.assign(w0, stochastic=False)
    w = p.to_float()
    step = _kernels.Step("sgd", lr=0.5, momentum=0.9, seed=11)
    step.step = 3
    assert _kernels.optim_step(step, p, g.reshape(-1).copy(), m) == 0
    # momentum starts at zero: the new m is g, the new w is w - lr * g (in fp32), and each
    # is rounded with its tensor's stream (seed, tensor id << 16 | micro-batch, step)
    expect_m = np.zeros(ROWS * COLS, np.uint16)
    _kernels.encode(g.reshape(-1), expect_m, "bf16", seed=11, stream=9 << 16, step=3)
    wn = (w - np.float32(0.5) * g).astype(np.float32).reshape(-1)
    expect_w = np.zeros(ROWS * COLS, np.uint16)
    _kernels.encode(wn, expect_w, fmt, seed=11, stream=4 << 16, step=3)
    np.testing.assert_array_equal(m.codes.reshape(-1), expect_m)
    np.testing.assert_array_equal(p.codes.reshape(-1), expect_w)
    assert np.all(np.isfinite(p.to_float()))
    assert np.all(p.to_float()[0, :4] == np.float32(top))


def test_int8_row_that_outgrows_its_scale_gets_a_new_one():
    p = new_tensor("int8", (2, 100), 0)
    row = np.linspace(-1, 1, 100, dtype=np.float32)
    p.assign(np.stack([row, row]))
    np.testing.assert_allclose(p.scales, 1 / 127, rtol=1e-6)
    g = np.zeros((2, 100), np.float32)
    g[0] = -row * 3            # row 0 grows to 4x its range, row 1 stays
    step = _kernels.Step("sgd", lr=1.0)
    _kernels.optim_step(step, p, g.reshape(-1))
    np.testing.assert_allclose(p.scales[0], 4 / 127, rtol=1e-5)
    np.testing.assert_allclose(p.scales[1], 1 / 127, rtol=1e-6)
    np.testing.assert_allclose(p.to_float()[0], 4 * row, atol=p.scales[0])
    assert np.abs(p.to_float()[0]).max() == pytest.approx(4.0, rel=1e-5)


def test_int8_weights_follow_updates_below_one_grid_step_on_average():
    """Stochastic rounding on int8: 200 updates of a fifth of a grid step each move the
    weights by 40 grid steps on average (with nearest they would not move)."""
    n = 4000
    p = new_tensor("int8", (1, n), 0)
    p.assign(np.full((1, n), 0.5, np.float32))        # scale 0.5 / 127
    grid = float(p.scales[0])
    step = _kernels.Step("sgd", lr=1.0, seed=3)
    for t in range(1, 201):
        step.step = t
        _kernels.optim_step(step, p, np.full(n, 0.2 * grid, np.float32))
    moved = (0.5 - p.to_float()) / grid
    # each copy moves by a sum of 200 Bernoulli(0.2) steps: mean 40, sd sqrt(32)
    assert abs(moved.mean() - 40) < 5 * np.sqrt(32 / n)


def test_round_to_int8_per_row_scales():
    x = np.array([[1.0, -0.5, 0.25], [10.0, 0, -10.0]], np.float32)
    y = sagd.round_to(x, "int8", "nearest")
    assert np.all(np.abs(y - x) <= np.array([[1 / 254], [10 / 254]]) + 1e-7)
    with pytest.raises(ValueError, match="one value per row"):
        sagd.round_to(x, "int8", scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive and finite"):
        sagd.round_to(x, "int8", scale=0.0)
