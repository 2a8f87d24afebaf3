"""Storage formats of weights and optimizer state, and rounding into them."""
import numpy as np

from . import _kernels

#: formats weights can be stored in
FORMATS = ("fp32", "bf16", "fp16", "int8")
#: formats optimizer state can be stored in
STATE_FORMATS = ("fp32", "bf16")
#: rounding modes of every write-back
ROUNDING = ("stochastic", "nearest")
#: bytes per stored element
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def check_choice(name, value, allowed):
    """value if it is one of allowed, else a ValueError that lists them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; choose one of "
                         + ", ".join(repr(a) for a in allowed))
    return value


def bias_format(weight_format):
    """Biases use the weights' format, except that int8 models keep biases in bf16
    (a bias has no row to share a scale with)."""
    return "bf16" if weight_format == "int8" else weight_format


def new_tensor(fmt, shape, tensor_id):
    """A zero tensor of the given shape stored in fmt (int8 rows start with scale 1)."""
    codes = np.zeros(shape, dtype=_kernels.CODE_DTYPES[_kernels.FORMATS[fmt]])
    scales = np.ones(shape[0], dtype=np.float32) if fmt == "int8" else None
    return _kernels.Stored(codes, fmt, tensor_id, scales)


def round_to(x, fmt, mode="stochastic", seed=0, scale=None):
    """Round x to the values representable in a storage format.

    Parameters
    ----------
    x : array_like
        Values; converted to float32 first (round to nearest).
    fmt : {"fp32", "bf16", "fp16", "int8"}
    mode : {"stochastic", "nearest"}
        "nearest" rounds ties to even, as numpy's float16 and ml_dtypes' bfloat16 casts
        do (overflow gives inf). "stochastic" returns the lower or the upper neighbour of
        each value, the upper one with probability equal to the value's fractional
        position between them, so that the result is unbiased; it saturates at the largest
        finite value instead of overflowing.
    seed : int
        Key of the random bits (Philox4x32-10). Element i (in C order) always uses the same
        bits for the same seed.
    scale : float or array_like, optional
        int8 only: the grid spacing, a scalar or one value per row (first axis). By default
        each row gets max|row| / 127.

    Returns
    -------
    numpy.ndarray of float32, shaped like x. NaN stays NaN and +-inf stays +-inf (also for
    int8, whose stored codes cannot hold them).
    """
    check_choice("fmt", fmt, FORMATS)
    check_choice("mode", mode, ROUNDING)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not (isinstance(seed, (int, np.integer)) and 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if fmt != "int8" and scale is not None:
        raise ValueError(f"scale applies to int8 only, not to {fmt}")
    flat = x.reshape(-1)
    stochastic = mode == "stochastic"
    if fmt == "fp32" or flat.size == 0:
        return x.copy()
    codes = np.empty(flat.size, dtype=_kernels.CODE_DTYPES[_kernels.FORMATS[fmt]])
    out = np.empty(flat.size, dtype=np.float32)
    if fmt != "int8":
        _kernels.encode(flat, codes, fmt, 1.0, stochastic, seed)
        _kernels.decode(codes, fmt, 1.0, out)
        return out.reshape(x.shape)

    rows = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    scales = _row_scales(rows, scale)
    cols = rows.shape[1]
    for r in range(rows.shape[0]):
        part = slice(r * cols, (r + 1) * cols)
        _kernels.encode(flat[part], codes[part], "int8", scales[r], stochastic, seed,
                        first_elem=r * cols)
        _kernels.decode(codes[part], "int8", scales[r], out[part])
    bad = ~np.isfinite(flat)
    out[bad] = flat[bad]
    return out.reshape(x.shape)


def _row_scales(rows, scale):
    n = rows.shape[0]
    if scale is None:
        with np.errstate(invalid="ignore"):
            mx = np.max(np.where(np.isfinite(rows), np.abs(rows), 0), axis=1)
        return np.where(mx > 0, mx / 127.0, 1.0).astype(np.float32)
    s = np.asarray(scale, dtype=np.float32)
    if s.ndim == 0:
        s = np.full(n, s, dtype=np.float32)
    s = s.reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"scale must be a scalar or one value per row ({n}), got shape "
                         f"{np.shape(scale)}")
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError("int8 scales must be positive and finite")
    return s
