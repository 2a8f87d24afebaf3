"""Optimizers and learning-rate schedules: the numbers each step hands to the fused update."""
import math
from dataclasses import dataclass

from . import _kernels

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "invscaling", "adaptive")


@dataclass
class Optimizer:
    """Settings of an optimizer. weight_decay is coupled (L2, added to the gradient) for
    sgd and adam, decoupled (w -= lr * weight_decay * w) for adamw, as in PyTorch.
    Biases are not decayed."""
    name: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: object = "constant"     # a name in SCHEDULES or a callable step -> lr
    power_t: float = 0.5

    def __post_init__(self):
        from .formats import check_choice
        check_choice("optimizer", self.name, OPTIMIZERS)
        if not callable(self.schedule):
            check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("momentum", "beta1", "beta2"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 <= v < 1):
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0
                and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def n_states(self):
        """State tensors per parameter tensor."""
        if self.name == "sgd":
            return 1 if self.momentum > 0 else 0
        return 2

    def kernel_step(self, seed, stochastic, weights=True):
        """A fresh kernel Step for weight matrices (weights=True) or biases (no decay)."""
        decay = self.weight_decay if weights else 0.0
        kind = "sgd" if self.name == "sgd" else "adam"
        return _kernels.Step(
            kind, lr=self.lr, momentum=self.momentum if kind == "sgd" else 0.0,
            nesterov=self.nesterov, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
            l2=decay if self.name != "adamw" else 0.0,
            decay=decay if self.name == "adamw" else 0.0, seed=seed, stochastic=stochastic)

    def lr_at(self, step, total_steps, lr_scale=1.0):
        """Learning rate of optimizer step `step` (1-based)."""
        s = self.schedule
        if callable(s):
            lr = float(s(step))
            if not (math.isfinite(lr) and lr >= 0):
                raise ValueError(f"the schedule returned lr={lr!r} at step {step}")
            return lr
        if s == "cosine":
            t = min(step, total_steps) / max(total_steps, 1)
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * t))
        if s == "invscaling":
            return self.lr / step ** self.power_t
        return self.lr * lr_scale       # constant; adaptive divides lr_scale by 5 on plateaus

    def prepare(self, steps, step, total_steps, lr_scale):
        """Set the per-step numbers of the kernel Steps for optimizer step `step`."""
        lr = self.lr_at(step, total_steps, lr_scale)
        bc1 = 1.0 / (1.0 - self.beta1 ** step)
        bc2 = 1.0 / (1.0 - self.beta2 ** step)
        for s in steps:
            s.lr, s.step, s.bc1, s.bc2 = lr, step, bc1, bc2
        return lr
