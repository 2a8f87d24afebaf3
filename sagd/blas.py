"""The BLAS behind scipy.linalg.cython_blas, and its threads while sagd works.

sagd runs the tiles of a layer in parallel on its own threads, each calling sgemm for its
tile. BLAS's own worker threads would only compete for the same cores (and spin between
calls), so while sagd trains or predicts it asks scipy's BLAS for one thread per call, and
gives the previous setting back afterwards: sagd.set_num_threads(n) is then the number of
threads the whole job uses. This works with the OpenBLAS that scipy's wheels bundle; with
another BLAS sagd keeps BLAS's threads and processes tiles one after another instead.
"""
import ctypes
import glob
import os
import threading
from contextlib import contextmanager

from . import _kernels

_lock = threading.Lock()
_users = 0
_saved = None
_control = None     # (get, set) ctypes functions, or False when there is none


def _find_control():
    """get/set thread functions of the OpenBLAS that scipy loaded, or None."""
    import scipy
    base = os.path.dirname(os.path.abspath(scipy.__file__))
    patterns = [os.path.join(base + ".libs", "*openblas*"),          # Linux, Windows wheels
                os.path.join(base, ".dylibs", "*openblas*"),         # macOS wheels
                os.path.join(base, "*openblas*")]
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                lib = ctypes.CDLL(path)         # the copy scipy already loaded
            except OSError:
                continue
            for prefix in ("scipy_", ""):
                get = getattr(lib, prefix + "openblas_get_num_threads", None)
                set_ = getattr(lib, prefix + "openblas_set_num_threads", None)
                if get is not None and set_ is not None:
                    get.restype = ctypes.c_int
                    set_.argtypes = [ctypes.c_int]
                    set_.restype = None
                    return get, set_
    return None


def control():
    global _control
    if _control is None:
        try:
            _control = _find_control() or False
        except Exception:       # an unusual scipy layout: no control, no harm
            _control = False
    return _control or None


def tile_threads():
    """Threads sagd runs a layer's tiles on: its own thread count when BLAS can be made
    single-threaded meanwhile, else 1 (BLAS then uses its own threads)."""
    return _kernels.get_num_threads() if control() is not None else 1


@contextmanager
def single_threaded():
    """While inside, scipy's BLAS uses one thread per call (nested and concurrent uses
    are counted; the first one in saves the setting, the last one out restores it).
    Without control over BLAS, nothing changes."""
    global _users, _saved
    ctl = control()
    if ctl is None:
        yield
        return
    get, set_ = ctl
    with _lock:
        if _users == 0:
            _saved = get()
            set_(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                set_(_saved)
