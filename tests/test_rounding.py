"""Rounding to bf16 / fp16 / int8: exactness against references, and the statistics of
stochastic rounding with tolerances derived from the sample size."""
import numpy as np
import pytest

import sagd
from sagd import _kernels
from sagd.formats import new_tensor

from . import oracle

ml_dtypes = pytest.importorskip("ml_dtypes")

SIMD = _kernels.simd_available()
N = 200_000          # draws per statistical case
Z = 5.0              # tolerance in standard errors


def wide_floats(n, seed=0):
    """float32 values over the whole exponent range, both signs, plus special values."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.0, -1.0, 65504, 65519.996,
                        65520, 65536, 3.4e38, -3.4e38, np.finfo(np.float32).max,
                        np.finfo(np.float32).tiny, 1e-45, 2**-25, 3 * 2**-25, 2**-24],
                       dtype=np.float32)
    return np.concatenate([special, x])


@pytest.fixture(params=SIMD)
def simd(request):
    before = _kernels.current_simd()
    _kernels.use_simd(request.param)
    yield request.param
    _kernels.use_simd(before)


def encode(x, fmt, stochastic, seed=0, stream=0, step=0, first=0, scale=1.0):
    codes = np.empty(x.size, dtype=_kernels.CODE_DTYPES[_kernels.FORMATS[fmt]])
    _kernels.encode(x, codes, fmt, scale, stochastic, seed, stream, step, first)
    return codes


# --------------------------------------------------------------------- nearest


def test_nearest_bf16_matches_ml_dtypes_bit_for_bit(simd):
    x = wide_floats(300_000)
    got = encode(x, "bf16", stochastic=False)
    with np.errstate(invalid="ignore"):
        want = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got, want)


def test_nearest_fp16_matches_numpy_bit_for_bit(simd):
    x = wide_floats(300_000, seed=1)
    got = encode(x, "fp16", stochastic=False)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(np.float16)
    finite = ~np.isnan(x)
    assert np.array_equal(got[finite], want.view(np.uint16)[finite])
    # NaN payload bits are not portable across numpy builds: NaN must stay NaN
    assert np.all(np.isnan(got[~finite].view(np.float16)))


def test_round_to_returns_representable_float32():
    x = np.random.default_rng(2).standard_normal((50, 40)).astype(np.float32)
    for fmt in ("bf16", "fp16"):
        y = sagd.round_to(x, fmt)
        assert y.dtype == np.float32 and y.shape == x.shape
        dt = ml_dtypes.bfloat16 if fmt == "bf16" else np.float16
        assert np.array_equal(y.astype(dt).astype(np.float32), y)
    y = sagd.round_to(x, "int8", scale=0.01)
    assert np.allclose(np.round(y / np.float32(0.01)), y / np.float32(0.01), atol=1e-4)
    assert np.all(np.abs(y) <= 127 * 0.01 + 1e-6)


# --------------------------------------------------------------------- stochastic, exact


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_stochastic_matches_reference_given_the_same_bits(fmt, simd):
    """Every element rounds up iff its own random bits say so (oracle in float64)."""
    x = wide_floats(100_000, seed=3)
    x = x[np.isfinite(x)]
    seed, stream, step, first = 0xDEADBEEF12345, 77, 3, 5
    got = encode(x, fmt, True, seed, stream, step, first)
    decoded = np.empty(x.size, np.float32)
    _kernels.decode(got, fmt, 1.0, decoded)
    bits = oracle.element_bits(fmt, seed, stream, step, first, x.size)
    want = oracle.stochastic_round(x, fmt, bits)
    assert np.array_equal(decoded.astype(np.float64), want)


def test_stochastic_int8_matches_reference_given_the_same_bits(simd):
    rng = np.random.default_rng(4)
    scale = np.float32(0.0123)
    x = (rng.standard_normal(50_000) * 60 * scale).astype(np.float32)
    x[:5] = [0, 127 * scale, 200 * scale, -300 * scale, 0.5 * scale]
    got = encode(x, "int8", True, seed=9, stream=3, step=1, scale=scale)
    bits = oracle.element_bits("int8", 9, 3, 1, 0, x.size)
    want = oracle.stochastic_round(x, "int8", bits, scale=float(scale))
    assert np.array_equal(got.astype(np.float64), np.round(want / float(scale)))


def test_random_words_are_philox4x32_10():
    # Known answers from the Random123 distribution (tests/kat_vectors).
    assert _kernels.philox4x32_10([0, 0, 0, 0], [0, 0]) == (
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _kernels.philox4x32_10([2**32 - 1] * 4, [2**32 - 1] * 2) == (
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert _kernels.philox4x32_10(
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("first", [0, 1, 3, 64, 1001])
@pytest.mark.parametrize("n", [777, 100, 7])     # whole lane groups, a part of one, blocks
def test_random_word_stream_matches_numpy_oracle(first, n, simd):
    seed, stream, step = 0x0123456789ABCDEF, 0xABCD0001, (7 << 32) + 11
    got = _kernels.random_words(seed, stream, step, first, n)
    assert np.array_equal(got, oracle.random_words(seed, stream, step, first, n))


# --------------------------------------------------------------------- statistics


def up_fraction(x, fmt, scale=1.0, seed=11, stream=0):
    """Fraction of N copies of x rounded to the upper (away from zero) neighbour, and the
    mean of the rounded values."""
    xs = np.full(N, x, dtype=np.float32)
    codes = encode(xs, fmt, True, seed=seed, stream=stream, scale=scale)
    vals = np.empty(N, np.float32)
    _kernels.decode(codes, fmt, scale, vals)
    scale = float(np.float32(scale))
    lo, hi, frac = oracle.neighbours(np.float32(x), fmt, scale if fmt == "int8" else None)
    lo, hi = np.float32(lo), np.float32(hi)  # as stored (int8: q * scale in fp32)
    mags = np.abs(vals)
    assert np.all((mags == lo) | (mags == hi)), "only the two neighbours may come out"
    return np.mean(mags == hi), float(frac), vals.astype(np.float64).mean(), lo, hi


def se(p):
    return np.sqrt(max(p * (1 - p), 1.0 / N) / N)


CASES = [
    ("bf16", 1.0 + 0.3 * 2**-7),          # normal, 30% of the way
    ("bf16", -(2.0 + 0.77 * 2**-6)),      # negative
    ("bf16", 5.25 * 2**-133),             # bf16 subnormal
    ("bf16", 3.0e38),                     # near the largest finite bf16
    ("fp16", 1.0 + 0.5 * 2**-10),         # exact tie
    ("fp16", 1000.0 + 0.123 * 0.5),       # normal
    ("fp16", 3.7 * 2**-24),               # fp16 subnormal
    ("fp16", 0.3 * 2**-24),               # below the smallest subnormal
    ("fp16", 1e-9),                       # far below (P(up) ~ 0.0168)
    ("fp16", -65500.0),                   # near the largest finite fp16
    ("int8", 0.37 * 0.05),                # int8 grid of 0.05
    ("int8", -(100 + 0.9) * 0.05),
]


@pytest.mark.parametrize("fmt,x", CASES)
def test_probability_of_rounding_up_is_the_fractional_position(fmt, x):
    p, frac, _, _, _ = up_fraction(x, fmt, scale=0.05)
    assert abs(p - frac) < Z * se(frac), (p, frac)


@pytest.mark.parametrize("fmt,x", CASES)
def test_stochastic_rounding_is_unbiased(fmt, x):
    _, frac, mean, lo, hi = up_fraction(x, fmt, scale=0.05)
    spread = (float(hi) - float(lo)) * se(frac)
    assert abs(abs(mean) - abs(np.float64(np.float32(x)))) < Z * spread


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8"])
def test_non_finite_values_pass_through(fmt):
    x = np.array([np.nan, np.inf, -np.inf, -np.nan, 1.0], np.float32)
    for mode in ("stochastic", "nearest"):
        y = sagd.round_to(x, fmt, mode, scale=0.1 if fmt == "int8" else None)
        assert np.isnan(y[0]) and np.isnan(y[3])
        assert y[1] == np.inf and y[2] == -np.inf and y[4] == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("fmt,top", [("bf16", float.fromhex("0x1.fep127")),
                                     ("fp16", 65504.0), ("int8", 127 * 0.5)])
def test_stochastic_rounding_saturates_instead_of_overflowing(fmt, top):
    big = np.finfo(np.float32).max
    x = np.array([top, np.nextafter(np.float32(top), np.float32(np.inf)), top * 1.001, big,
                  -big] * 20_000, np.float32)
    with np.errstate(over="ignore"):
        y = sagd.round_to(x, fmt, "stochastic", seed=5,
                          scale=0.5 if fmt == "int8" else None)
    assert np.all(np.isfinite(y))
    assert np.all(np.abs(y) <= np.float32(top))
    assert np.all(np.abs(y[x > top]) == np.float32(top))


def test_two_identical_tensors_get_independent_streams():
    x = np.full(N, 1.0 + 0.5 * 2**-7, np.float32)   # P(up) = 1/2 in bf16
    a = encode(x, "bf16", True, seed=3, stream=1)
    b = encode(x, "bf16", True, seed=3, stream=2)
    ua, ub = (a != a.min()).astype(float), (b != b.min()).astype(float)
    r = np.corrcoef(ua, ub)[0, 1]
    assert abs(r) < Z / np.sqrt(N)
    assert abs(ua.mean() - 0.5) < Z * se(0.5) and abs(ub.mean() - 0.5) < Z * se(0.5)


def test_seeds_and_steps_change_the_bits_and_nothing_else_does():
    x = np.full(10_000, 1.0 + 0.5 * 2**-7, np.float32)
    base = encode(x, "bf16", True, seed=1, stream=0, step=1)
    assert np.array_equal(base, encode(x, "bf16", True, seed=1, stream=0, step=1))
    for kw in ({"seed": 2, "step": 1}, {"seed": 1, "step": 2}):
        other = encode(x, "bf16", True, stream=0, **kw)
        assert 0.4 < np.mean(other != base) < 0.6


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "int8"])
def test_bits_do_not_depend_on_tiles_threads_or_simd(fmt):
    x = np.random.default_rng(6).standard_normal(100_003).astype(np.float32)
    whole = encode(x, fmt, True, seed=8, stream=5, step=2, scale=0.02)
    # cut into uneven tiles, odd offsets included
    cuts = [0, 1, 7, 4096, 33_333, 65_537, x.size]
    pieces = np.concatenate([
        encode(x[a:b], fmt, True, seed=8, stream=5, step=2, first=a, scale=0.02)
        for a, b in zip(cuts[:-1], cuts[1:])])
    assert np.array_equal(whole, pieces)
    before, threads = _kernels.current_simd(), _kernels.get_num_threads()
    try:
        for level in SIMD:
            _kernels.use_simd(level)
            for n in (1, 2, 3):
                _kernels.set_num_threads(n)
                assert np.array_equal(
                    whole, encode(x, fmt, True, seed=8, stream=5, step=2, scale=0.02))
    finally:
        _kernels.use_simd(before)
        _kernels.set_num_threads(threads)


# --------------------------------------------------------------------- why it matters


@pytest.mark.parametrize("mode,expect", [("stochastic", 0.9), ("nearest", 1.0)])
def test_small_updates_survive_only_with_stochastic_rounding(mode, expect):
    """A bf16 weight of 1.0 receiving 1000 updates of -1e-4 (below half an ulp, which is
    2^-9 just under 1) through the fused SGD write-back."""
    n = 4096                      # independent copies of the one weight
    w = new_tensor("bf16", (n,), tensor_id=1)
    w.assign(np.ones(n, np.float32), stochastic=False)
    step = _kernels.Step("sgd", lr=1e-4, stochastic=(mode == "stochastic"), seed=12)
    for t in range(1, 1001):
        step.step = t
        _kernels.optim_step(step, w, np.ones(n, np.float32))
    final = w.to_float()
    if mode == "nearest":
        assert np.all(final == 1.0)
    else:
        # each step moves a weight down one ulp (2^-8 below 1) with P = 1e-4 / 2^-8,
        # so after 1000 steps a copy sits at 1 - K 2^-8, K ~ Binomial(1000, 0.0256)
        ulp, p = 2.0**-8, 1e-4 / 2.0**-8
        sd_one = ulp * np.sqrt(1000 * p * (1 - p))
        assert abs(final.mean() - expect) < Z * sd_one / np.sqrt(n)
        assert np.all(np.abs(final - expect) < 8 * sd_one)
