"""Losses and their gradients, computed stably in fp32, against float64 numpy."""
import numpy as np
import pytest

from sagd import _kernels


def logsumexp(z):
    m = z.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]


@pytest.mark.parametrize("spread", [1.0, 100.0, 1e4])
def test_softmax_cross_entropy_and_gradient(spread):
    rng = np.random.default_rng(0)
    z = (rng.standard_normal((50, 7)) * spread).astype(np.float32)
    y = rng.integers(0, 7, 50).astype(np.int32)
    w = rng.uniform(0.5, 2, 50).astype(np.float32)
    z64 = z.astype(np.float64)
    loss_ref = np.sum(w * (logsumexp(z64) - z64[np.arange(50), y]))
    p = np.exp(z64 - logsumexp(z64)[:, None])
    grad_ref = (p - np.eye(7)[y]) * w[:, None] * 0.1
    g = z.copy()
    loss = _kernels.softmax_xent(g, y, w, scale=0.1)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, grad_ref, atol=1e-6)


def test_softmax_probabilities_are_finite_and_sum_to_one():
    z = np.array([[1e30, -1e30, 0], [-80, -90, -100], [0, 0, 0], [88, 89, 90]], np.float32)
    _kernels.softmax(z)
    assert np.all(np.isfinite(z)) and np.all(z >= 0)
    np.testing.assert_allclose(z.sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize("spread", [1.0, 50.0, 1e4])
def test_sigmoid_binary_cross_entropy_and_gradient(spread):
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((60, 1)) * spread).astype(np.float32)
    y = rng.integers(0, 2, 60).astype(np.int32)
    z64 = z[:, 0].astype(np.float64)
    loss_ref = np.sum(np.logaddexp(0, z64) - z64 * y)
    p = np.exp(-np.logaddexp(0, -z64))
    g = z.copy()
    loss = _kernels.sigmoid_xent(g, y)
    assert np.isfinite(loss) and loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(g[:, 0], p - y, atol=1e-6)
    s = z[:, 0].copy()
    _kernels.sigmoid(s)
    assert np.all((s >= 0) & (s <= 1))
    np.testing.assert_allclose(s, p, atol=1e-6)


def test_squared_error_and_gradient():
    rng = np.random.default_rng(2)
    z = rng.standard_normal((40, 3)).astype(np.float32)
    y = rng.standard_normal((40, 3)).astype(np.float32)
    w = rng.uniform(0, 1, 40).astype(np.float32)
    d = z.astype(np.float64) - y
    g = z.copy()
    loss = _kernels.squared_error(g, y, w, scale=0.5)
    assert loss == pytest.approx(np.sum(w * 0.5 * (d ** 2).sum(axis=1)), rel=1e-6)
    np.testing.assert_allclose(g, d * w[:, None] * 0.5, atol=1e-6)


def test_label_codes_outside_the_classes_are_rejected():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="label code 4 at row 1"):
        _kernels.softmax_xent(z, np.array([0, 4, 1], np.int32))
