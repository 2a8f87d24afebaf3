"""sagd: train neural networks on the device that holds the data."""
from .formats import round_to  # noqa: F401
