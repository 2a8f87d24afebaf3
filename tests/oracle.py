"""Float64 numpy references for the kernels, written from the definitions, not the C."""
import numpy as np

U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Philox4x32-10 on arrays of counters (4 arrays) with a key (2 ints)."""
    c = [np.asarray(v, dtype=np.uint64) & U32 for v in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & U32, p1 & U32,
             ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & U32, p0 & U32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & U32
        k1 = (k1 + np.uint64(0xBB67AE85)) & U32
    return np.stack(c, axis=-1).astype(np.uint32)


def random_words(seed, stream, step, first_word, n):
    """Words first_word.. of the stream: word j comes from block j // 4, position j % 4."""
    j = np.arange(first_word, first_word + n, dtype=np.uint64)
    blocks = j // np.uint64(4)
    ctr = [blocks, np.full_like(blocks, stream), np.full_like(blocks, step & 0xFFFFFFFF),
           np.full_like(blocks, step >> 32)]
    out = philox4x32_10(ctr, [seed & 0xFFFFFFFF, seed >> 32])
    return out[np.arange(n), (j % np.uint64(4)).astype(np.intp)]


def element_bits(fmt, seed, stream, step, first_elem, n):
    """The random bits each element of a write uses: 16 for bf16, 32 for fp16 and int8."""
    e = np.arange(first_elem, first_elem + n, dtype=np.uint64)
    if fmt == "bf16":
        w0 = int(first_elem) // 2
        words = random_words(seed, stream, step, w0, (int(first_elem) + n + 1) // 2 - w0 + 1)
        w = words[(e // np.uint64(2)).astype(np.int64) - w0].astype(np.uint64)
        return (w >> (np.uint64(16) * (e % np.uint64(2)))) & np.uint64(0xFFFF)
    return random_words(seed, stream, step, first_elem, n).astype(np.uint64)


# Format grids: spacing of representable values at |x| (float64, exact for powers of two).
GRID = {
    # (fraction bits, smallest normal exponent, largest finite value)
    "bf16": (7, -126, float.fromhex("0x1.fep127")),
    "fp16": (10, -14, 65504.0),
}


def neighbours(x, fmt, scale=None):
    """Lower and upper representable neighbours of x (float64) in the format, toward zero
    and away from zero, and the fractional position of x between them."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    if fmt == "int8":
        t = a / scale
        lo = np.floor(t)
        return lo * scale, (lo + 1) * scale, t - lo
    bits, emin, _ = GRID[fmt]
    e = np.frexp(np.where(a > 0, a, 1.0))[1] - 1  # exact floor(log2(a))
    ulp = np.exp2(np.maximum(e, emin) - bits)
    lo = np.floor(a / ulp) * ulp
    return lo, lo + ulp, (a - lo) / ulp


def stochastic_round(x, fmt, bits, scale=None):
    """Stochastic rounding of float32 x given each element's random bits: up (away from
    zero) iff u < fractional position, u = bits / 2^nbits."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    lo, hi, frac = neighbours(x, fmt, scale)
    nbits = 16 if fmt == "bf16" else 32
    u = bits.astype(np.float64) / 2.0 ** nbits
    mag = np.where(u < frac, hi, lo)
    top = 127 * scale if fmt == "int8" else GRID[fmt][2]
    mag = np.minimum(mag, top)
    return np.where(np.isfinite(x), np.copysign(mag, x), x)


def dense_forward(a, W, b, act):
    z = a.astype(np.float64) @ W.astype(np.float64).T + b.astype(np.float64)
    return z, activate(z, act)


def activate(z, act):
    from math import erf
    if act == "identity":
        return z
    if act == "relu":
        return np.maximum(z, 0)
    if act == "tanh":
        return np.tanh(z)
    if act == "sigmoid":
        return 1 / (1 + np.exp(-z))
    if act == "gelu":
        return 0.5 * z * (1 + np.vectorize(erf)(z / np.sqrt(2)))
    raise ValueError(act)


def activation_grad(z, act):
    """d act / d z, by central differences in float64 (independent of the closed forms)."""
    h = 1e-6
    return (activate(z + h, act) - activate(z - h, act)) / (2 * h)


def adam(w, grads, lr, b1, b2, eps, l2=0.0, decay=0.0):
    """Adam / AdamW in float64 over a list of gradients (as PyTorch defines it)."""
    w = w.astype(np.float64).copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64) + l2 * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * (mhat / (np.sqrt(vhat) + eps) + decay * w)
    return w, m, v


def sgd(w, grads, lr, momentum=0.0, nesterov=False, l2=0.0):
    """SGD with momentum / Nesterov in float64 (as PyTorch defines it)."""
    w = w.astype(np.float64).copy()
    buf = np.zeros_like(w)
    for g in grads:
        g = g.astype(np.float64) + l2 * w
        if momentum:
            buf = momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        w = w - lr * g
    return w, buf
