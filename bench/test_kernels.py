"""pytest-benchmark suite of the kernels, to run on your own hardware:

    pytest bench/ --benchmark-only

Compare each group's rows: the numpy copy (rounding) and the numpy sgemm products (dense
step) are the baselines measured in the same run.
"""
import numpy as np
import pytest

from sagd import _kernels, blas

N = 1 << 22


@pytest.fixture(scope="module")
def values():
    return np.random.default_rng(0).standard_normal(N).astype(np.float32)


@pytest.mark.benchmark(group="rounding 4M float32")
def test_numpy_copy_baseline(benchmark, values):
    out = np.empty_like(values)
    benchmark(np.copyto, out, values)


@pytest.mark.benchmark(group="rounding 4M float32")
@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("mode", ["stochastic", "nearest"])
def test_round(benchmark, values, fmt, mode):
    codes = np.empty(N, _kernels.CODE_DTYPES[_kernels.FORMATS[fmt]])
    benchmark(_kernels.encode, values, codes, fmt, 0.05, mode == "stochastic", 1, 2, 3)


B, D = 128, 1024


@pytest.mark.benchmark(group="dense step 128 x 1024 x 1024")
def test_numpy_sgemm_baseline(benchmark):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((D, D)).astype(np.float32)
    a = rng.standard_normal((B, D)).astype(np.float32)
    g = rng.standard_normal((B, D)).astype(np.float32)
    z, dA, dW = np.empty((B, D), np.float32), np.empty((B, D), np.float32), np.empty_like(W)

    def products():
        np.matmul(a, W.T, out=z)
        np.matmul(g, W, out=dA)
        np.matmul(g.T, a, out=dW)
    benchmark(products)


@pytest.mark.benchmark(group="dense step 128 x 1024 x 1024")
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "fp16", "int8"])
def test_dense_step(benchmark, fmt):
    from kernels import layer          # bench/kernels.py: the same layer step it times
    with blas.single_threaded():
        run, _, _ = layer(fmt, B, D)
        benchmark(run)
