"""Kernel speed, side by side in one run: the rounding kernel against a numpy copy of the
same bytes, and one tiled dense layer step (forward, backward, fused update) against the
same three sgemm products done by numpy. Prints a markdown table.

    python bench/kernels.py [--repeats 15]
"""
import argparse
import time

import numpy as np

import sagd
from compare import machine
from sagd import _kernels, blas
from sagd.formats import bias_format, new_tensor


def interleaved(fns, repeats, inner, settle=0.3):
    """Median seconds per call of each function, the functions taking turns. Between turns
    the machine settles for `settle` seconds: a BLAS's worker threads spin for a while after
    its last call and would otherwise take cores from the next function."""
    times = {name: [] for name in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for name, f in fns.items():
            time.sleep(settle)
            t = time.perf_counter()
            for _ in range(inner):
                f()
            times[name].append((time.perf_counter() - t) / inner)
    return {name: float(np.median(v)) for name, v in times.items()}


def rounding(repeats, n=1 << 22):
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    copy = np.empty_like(x)
    fns = {"numpy copy of the fp32 input": lambda: np.copyto(copy, x)}
    for fmt in ("bf16", "fp16", "int8"):
        codes = np.empty(n, _kernels.CODE_DTYPES[_kernels.FORMATS[fmt]])
        for mode in ("stochastic", "nearest"):
            fns[f"round to {fmt}, {mode}"] = (
                lambda codes=codes, fmt=fmt, mode=mode:
                _kernels.encode(x, codes, fmt, 0.05, mode == "stochastic", 1, 2, 3))
    t = interleaved(fns, repeats, 5)
    base = t["numpy copy of the fp32 input"]
    rows = [(name, n / s / 1e9, s / base) for name, s in t.items()]
    return n, rows


def layer(fmt, batch=128, n=1024, tile=None):
    rng = np.random.default_rng(0)
    state = "fp32" if fmt == "fp32" else "bf16"
    W = new_tensor(fmt, (n, n), 0)
    W.assign(rng.standard_normal((n, n)).astype(np.float32) * 0.03)
    b = new_tensor(bias_format(fmt), (n,), 1)
    st = [new_tensor(state, s, i) for i, s in enumerate([(n, n), (n, n), (n,), (n,)], 2)]
    a = rng.standard_normal((batch, n)).astype(np.float32)
    z = np.empty((batch, n), np.float32)
    g = rng.standard_normal((batch, n)).astype(np.float32) * 0.01
    dA = np.empty((batch, n), np.float32)
    slots = blas.tile_threads()
    spec = sagd.budget.Spec(sizes=(n, n), weights=fmt, slots=slots)
    tile = tile or spec.full_tiles()[0]
    scratch = np.empty(_kernels.backward_scratch_size(fmt, bias_format(fmt), tile, n, slots),
                       np.float32)
    step = _kernels.Step("adam", lr=1e-4, seed=1)

    def run():
        _kernels.dense_forward(a, W, b, z, z, "relu", tile, scratch)
        _kernels.dense_backward(g, a, dA, W, b, st[0], st[1], st[2], st[3], step, tile,
                                scratch)
    return run, tile, slots


def dense(repeats, batch=128, n=1024):
    rng = np.random.default_rng(1)
    Wf = rng.standard_normal((n, n)).astype(np.float32)
    a = rng.standard_normal((batch, n)).astype(np.float32)
    g = rng.standard_normal((batch, n)).astype(np.float32)
    z = np.empty((batch, n), np.float32)
    dA = np.empty((batch, n), np.float32)
    dW = np.empty((n, n), np.float32)

    def sgemms():
        np.matmul(a, Wf.T, out=z)
        np.matmul(g, Wf, out=dA)
        np.matmul(g.T, a, out=dW)
    rows, info = [], {}
    with blas.single_threaded():
        for fmt in ("fp32", "bf16", "fp16", "int8"):
            # each format alone against the reference: other layers' state would only
            # evict this one's from the caches
            run, tile, slots = layer(fmt, batch, n)
            info[fmt] = (tile, slots)
            t = interleaved({"ref": sgemms, "sagd": run}, repeats, 10)
            rows.append((f"sagd step, {fmt} weights", t["sagd"] * 1e3, t["sagd"] / t["ref"],
                         t["ref"] * 1e3))
    return rows, info


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15,
                   help="timed turns per kernel; medians are reported (%(default)s)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    n, rows = rounding(args.repeats)
    print(f"machine: {machine()}; {_kernels.get_num_threads()} sagd threads, "
          f"SIMD {_kernels.current_simd()}, sagd {sagd.__version__}\n")
    print(f"Rounding {n:,} float32 values (median of {args.repeats}, interleaved)\n")
    print("| kernel | Gelem/s | time / numpy copy |\n|---|---:|---:|")
    for name, rate, ratio in rows:
        print(f"| {name} | {rate:.2f} | {ratio:.2f} |")
    rows, info = dense(args.repeats)
    print("\nOne dense layer step, batch 128, 1024 x 1024, Adam (bf16 state for low-precision "
          "weights), relu: forward + dA + dW + fused update\n")
    print("| | ms | numpy sgemm products, ms (same turns) | ratio |\n|---|---:|---:|---:|")
    for name, ms, ratio, ref in rows:
        print(f"| {name} | {ms:.2f} | {ref:.2f} | {ratio:.2f} |")
    tile, slots = info["bf16"]
    print(f"\n(tiles of {tile} rows on {slots} threads)")


if __name__ == "__main__":
    main()
