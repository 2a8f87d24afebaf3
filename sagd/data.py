"""The caller's data, read in place: validation, labels, and batches gathered into sagd's
own fp32 buffers. X and y are never copied whole (they may be memmaps larger than RAM);
every pass over them goes through buffers the memory plan counted.
"""
import numbers
import sys

import numpy as np

from . import _kernels

_GATHER_DTYPES = {np.dtype(t) for t in (np.float64, np.float32, np.int64, np.int32, np.int16,
                                        np.int8, np.uint64, np.uint32, np.uint16, np.uint8)}


def _sparse_kind(X):
    """The scipy.sparse format of X, or None. A sparse matrix can only exist once
    scipy.sparse is imported, so this never imports it (an import inside fit would be
    memory the budget pays for)."""
    sp = sys.modules.get("scipy.sparse")
    return X.format if sp is not None and sp.issparse(X) else None


def as_matrix(X, name="X"):
    """X as a 2-D array-like that sagd can read rows of without copying it whole: numpy
    arrays (any numeric dtype, any strides, memmaps) and scipy CSR matrices."""
    kind = _sparse_kind(X)
    if kind is not None:
        if kind != "csr":
            raise TypeError(f"{name} is a scipy.sparse {kind} matrix; sagd reads sparse data "
                            f"row by row and needs CSR: pass {name}.tocsr()")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {X.shape})")
        return X
    if hasattr(X, "to_numpy") and hasattr(X, "columns"):       # pandas DataFrame
        bad = [f"{c} ({dt})" for c, dt in X.dtypes.items()
               if getattr(dt, "kind", "O") not in "biuf"]
        if bad:
            raise ValueError(f"{name} has columns that are not plain numbers: "
                             f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}; "
                             "convert or encode them first (nullable and category columns too)")
        if any(not isinstance(dt, np.dtype) for dt in X.dtypes):
            X = X.to_numpy(dtype=np.float64, na_value=np.nan)   # nullable columns: NA -> NaN
        else:
            X = X.to_numpy()
    if not isinstance(X, np.ndarray):
        X = np.asarray(X)
    if X.ndim != 2:
        hint = (" (a single feature: use X.reshape(-1, 1); a single sample: "
                "X.reshape(1, -1))" if X.ndim == 1 else "")
        raise ValueError(f"{name} must be 2-D (samples x features), got {X.ndim}-D with "
                         f"shape {X.shape}{hint}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {X.shape}); it needs at least one sample "
                         "and one feature")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers (bool, int or float); got dtype "
                         f"{X.dtype}")
    return X


def gather(X, idx, out):
    """out[:len(idx)] = X[idx] as float32, through no buffer larger than the rows."""
    m = idx.shape[0]
    if isinstance(X, np.ndarray):
        dt = X.dtype
        if dt in _GATHER_DTYPES:
            _kernels.gather_rows(X, idx, out)
        elif dt == np.float16:
            _kernels.gather_rows_fp16(X.view(np.uint16), idx, out)
        elif dt == np.bool_:
            _kernels.gather_rows(X.view(np.uint8), idx, out)
        else:       # rarer dtypes (longdouble, ...): numpy converts row by row
            for j in range(m):
                out[j] = X[idx[j]]
    else:           # CSR: rows densified straight from the matrix's arrays
        data = X.data if X.data.dtype in _GATHER_DTYPES else X.data.astype(np.float64)
        indptr = X.indptr
        indices = X.indices if X.indices.dtype == indptr.dtype else X.indices.astype(indptr.dtype)
        _kernels.gather_csr(data, indices, indptr, X.shape[1], idx, out)
    return out[:m]


def check_finite(X, buf, name="X"):
    """Scan X in chunks of buf's rows; ValueError naming the first NaN, infinity, or value
    too large for float32 (row and column)."""
    n, rows = X.shape[0], buf.shape[0]
    idx = np.empty(rows, np.int64)
    for s in range(0, n, rows):
        m = min(rows, n - s)
        idx[:m] = np.arange(s, s + m)
        block = gather(X, idx[:m], buf)
        hit = _kernels.first_nonfinite(block)
        if hit is not None:
            r, c = s + hit[0], hit[1]
            v = plain(X[r].toarray()[0, c] if _sparse_kind(X) else X[r, c])
            if np.isfinite(v):
                raise ValueError(f"{name}[{r}, {c}] = {v!r} is too large for float32 (it would "
                                 "become inf); scale the input (e.g. with StandardScaler)")
            what = "NaN" if np.isnan(v) else ("inf" if v > 0 else "-inf")
            raise ValueError(f"{name} contains {what} at row {r}, column {c}; sagd needs "
                             "finite values (drop or impute missing ones first)")


def as_targets(y, n, name="y"):
    """y as a 1-D or 2-D array of n rows (pandas Series/DataFrame accepted)."""
    if hasattr(y, "to_numpy"):
        y = y.to_numpy()
    if not isinstance(y, np.ndarray):
        y = np.asarray(y)
    if y.ndim == 0 or y.ndim > 2:
        raise ValueError(f"{name} must be 1-D (or 2-D for several targets), got shape "
                         f"{y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"X has {n} samples but {name} has {y.shape[0]}; they must match")
    return y


def check_sample_weight(sample_weight, n):
    if sample_weight is None:
        return None
    if hasattr(sample_weight, "to_numpy"):
        sample_weight = sample_weight.to_numpy()
    w = np.asarray(sample_weight)
    if w.ndim == 0:
        w = np.full(n, float(w))
    if w.ndim != 1 or w.shape[0] != n:
        raise ValueError(f"sample_weight must have one value per sample ({n}), got shape "
                         f"{w.shape}")
    if w.dtype.kind not in "biuf":
        raise ValueError(f"sample_weight must be numeric, got dtype {w.dtype}")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if bad.size:
        raise ValueError(f"sample_weight[{bad[0]}] = {plain(w[bad[0]])!r}; weights must be "
                         "finite and non-negative")
    if not np.any(w > 0):
        raise ValueError("sample_weight is zero everywhere; nothing to learn from")
    return w


# ---------------------------------------------------------------------- labels


def plain(v):
    """A numpy scalar as the Python value it holds (for messages: 3, not np.int64(3))."""
    return v.item() if isinstance(v, np.generic) else v


def find_classes(y, chunk):
    """Sorted unique labels of a 1-D y, found chunk by chunk."""
    classes = None
    for s in range(0, y.shape[0], chunk):
        part = y[s:s + chunk]
        if part.dtype == object:
            for i, v in enumerate(part):
                if v is None or (isinstance(v, float) and np.isnan(v)):
                    raise ValueError(f"y contains a missing label ({v}) at row {s + i}")
            kinds = {type(v) for v in part}
            numeric = {k for k in kinds if issubclass(k, (numbers.Number, np.generic))
                       and not issubclass(k, (str, bytes))}
            if numeric and numeric != kinds:
                raise ValueError("y mixes label types (" + ", ".join(
                    sorted(k.__name__ for k in kinds)) + "); use labels of one type")
        elif part.dtype.kind == "f" and not np.all(np.isfinite(part)):
            bad = s + int(np.flatnonzero(~np.isfinite(part))[0])
            raise ValueError(f"y contains {'NaN' if np.isnan(y[bad]) else 'inf'} at row {bad}; "
                             "labels must be finite")
        u = np.unique(part)
        classes = u if classes is None else np.union1d(classes, u)
    return classes


def encode_labels(labels, classes, out):
    """out[:m] = index of each label in the sorted classes; ValueError for a label that
    is not one of them (it is never mapped to a neighbour)."""
    m = labels.shape[0]
    pos = np.searchsorted(classes, labels)
    pos = np.minimum(pos, classes.shape[0] - 1)
    miss = classes[pos] != labels
    if np.any(miss):
        bad = plain(labels[int(np.flatnonzero(miss)[0])])
        raise ValueError(f"y contains the label {bad!r}, which is not one of the classes "
                         f"{classes.tolist()}")
    out[:m] = pos
    return out[:m]


def check_labels_known(y, classes, chunk, codes_buf):
    """Every label of y is one of classes (scanned chunk by chunk)."""
    for s in range(0, y.shape[0], chunk):
        encode_labels(y[s:s + chunk], classes, codes_buf)


def check_regression_targets(y, chunk):
    for s in range(0, y.shape[0], chunk):
        part = y[s:s + chunk]
        if part.dtype.kind not in "biuf":
            raise ValueError(f"regression targets must be numbers, got dtype {y.dtype}")
        finite = np.isfinite(part)
        if not np.all(finite):
            r = s + int(np.flatnonzero(~finite.reshape(part.shape[0], -1).all(axis=1))[0])
            raise ValueError(f"y contains NaN or inf at row {r}; targets must be finite")
