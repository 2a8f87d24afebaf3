"""Training on real data: every storage format learns the digits, stochastic rounding
keeps learning where round-to-nearest stalls, and regression beats the mean."""
import numpy as np
import pytest

import sagd
from sagd.datasets import load_digits

X, Y = load_digits()
ORDER = np.random.default_rng(0).permutation(X.shape[0])
TRAIN, TEST = ORDER[:1300], ORDER[1300:]


@pytest.mark.parametrize("weights", sagd.FORMATS)
def test_every_format_learns_the_digits(weights):
    m = sagd.fit(X[TRAIN], Y[TRAIN], hidden=(64,), epochs=25, batch_size=32, lr=2e-3,
                 weights=weights, seed=0)
    assert m.score(X[TEST], Y[TEST]) >= 0.95


def test_stochastic_rounding_keeps_learning_where_nearest_stalls():
    """bf16 with a small learning rate: Adam's steps of ~1e-4 are below half an ulp of most
    weights (2^-9 * |w|), so round-to-nearest throws them away while stochastic rounding
    keeps them on average and tracks fp32."""
    kw = dict(hidden=(64,), epochs=8, batch_size=32, lr=1e-4, seed=1)
    acc = {}
    for weights, rounding in (("fp32", "nearest"), ("bf16", "stochastic"),
                              ("bf16", "nearest")):
        m = sagd.fit(X[TRAIN], Y[TRAIN], weights=weights, rounding=rounding, **kw)
        acc[weights, rounding] = m.score(X[TEST], Y[TEST])
    fp32, sr, rn = acc["fp32", "nearest"], acc["bf16", "stochastic"], acc["bf16", "nearest"]
    assert sr > rn + 0.10, acc
    assert abs(sr - fp32) < 0.05, acc


def test_regression_on_diabetes_beats_the_mean():
    datasets = pytest.importorskip("sklearn.datasets")
    Xd, yd = datasets.load_diabetes(return_X_y=True)
    Xd = (Xd - Xd.mean(axis=0)) / Xd.std(axis=0)
    order = np.random.default_rng(0).permutation(Xd.shape[0])
    tr, te = order[:340], order[340:]
    mu, sd = yd[tr].mean(), yd[tr].std()
    m = sagd.fit(Xd[tr], (yd[tr] - mu) / sd, hidden=(16,), epochs=30, lr=3e-3,
                 batch_size=32, weight_decay=1e-3, seed=0)
    pred = m.predict(Xd[te]) * sd + mu
    mse = np.mean((pred - yd[te]) ** 2)
    mse_mean = np.mean((mu - yd[te]) ** 2)      # the mean predictor
    # (least squares reaches 0.64 of the mean's error on this split)
    assert mse < 0.75 * mse_mean
    assert m.score(Xd[te], (yd[te] - mu) / sd) > 0.25


def test_skipping_zero_input_columns_trains_the_same_model(monkeypatch):
    """The digits have columns that are zero in a whole batch (the image border): the first
    layer skips them. fp32 with round-to-nearest shows the weights are those of the full
    products, up to the order of the sums."""
    from sagd import network

    def train(share):
        monkeypatch.setattr(network, "ZERO_COLUMNS_WORTH_SKIPPING", share)
        return sagd.fit(X[TRAIN], Y[TRAIN], hidden=(32,), epochs=2, batch_size=32,
                        weights="fp32", rounding="nearest", seed=0)

    # every batch of 32 has at least 3 of the 64 columns zero (more than 1/64 of them)
    assert (X != 0).any(axis=0).sum() <= 61
    skipping, full = train(1 / 64), train(1.0)      # 1.0: never skip
    for a, b in zip(skipping.network.layers, full.network.layers):
        np.testing.assert_allclose(a.W.to_float(), b.W.to_float(), rtol=1e-3, atol=1e-4)
    assert abs(skipping.score(X[TEST], Y[TEST]) - full.score(X[TEST], Y[TEST])) < 0.01
