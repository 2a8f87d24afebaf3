"""sagd: train neural networks on the device that holds the data, under a hard memory
budget, with low-precision weights and stochastic rounding.

    model = sagd.fit(X, y, memory_budget="16MB")
    model.predict(X_test)
"""
from . import datasets
from ._kernels import get_num_threads, set_num_threads
from .budget import MemoryBudgetError, MemoryPlan, parse_budget
from .formats import FORMATS, round_to
from .model import Model, fit, plan
from .trainer import TrainingDivergedError

__version__ = "0.1.0"

__all__ = ["fit", "plan", "load", "Model", "datasets", "MemoryPlan", "MemoryBudgetError",
           "TrainingDivergedError", "round_to", "FORMATS", "parse_budget",
           "set_num_threads", "get_num_threads", "MLPClassifier", "MLPRegressor"]


def load(path):
    """Read a model written by Model.save."""
    from .files import load as _load
    return _load(path)


def __getattr__(name):
    # the scikit-learn estimators import scikit-learn, an optional dependency
    if name in ("MLPClassifier", "MLPRegressor"):
        from . import estimators
        return getattr(estimators, name)
    raise AttributeError(f"module 'sagd' has no attribute {name!r}")
